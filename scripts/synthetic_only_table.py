import pandas as pd

from segsynth.tables import write_synthetic_only_tables
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_synthetic_only_tables,
    runs=pd.DataFrame(snakemake.params.runs),
    baselines=pd.DataFrame(snakemake.params.baselines),
    parquet_path=snakemake.output.parquet,
    markdown_path=snakemake.output.markdown,
)
