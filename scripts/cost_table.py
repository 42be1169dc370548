from segsynth.tables import write_cost_tables
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_cost_tables,
    benchmark_files=list(snakemake.input),
    parquet_path=snakemake.output.parquet,
    markdown_path=snakemake.output.markdown,
)
