import pandas as pd

from segsynth.tables import write_main_tables
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_main_tables,
    runs=pd.DataFrame(snakemake.params.runs),
    parquet_path=snakemake.output.parquet,
    markdown_path=snakemake.output.markdown,
    tsv_path=snakemake.output.tsv,
    fidelity_path=snakemake.input.fidelity,
    adherence_path=snakemake.input.adherence,
)
