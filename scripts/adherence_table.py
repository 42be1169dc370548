import pandas as pd

from segsynth.tables import write_adherence_tables
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_adherence_tables,
    rows=pd.DataFrame(snakemake.params.runs),
    parquet_path=snakemake.output.parquet,
    markdown_path=snakemake.output.markdown,
    scorers=snakemake.params.scorers,
)
