import pandas as pd

from segsynth.analyses import write_budget_tables
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_budget_tables,
    runs=pd.DataFrame(snakemake.params.runs),
    baseline=pd.DataFrame(snakemake.params.baseline),
    parquet_path=snakemake.output.parquet,
    markdown_path=snakemake.output.markdown,
)
