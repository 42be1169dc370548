from segsynth.tables import write_cost_tables
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_cost_tables,
    benchmark_dir=snakemake.params.benchmarks,
    parquet_path=snakemake.output.parquet,
    markdown_path=snakemake.output.markdown,
)
