from segsynth.tables import write_order_ablation_tables
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_order_ablation_tables,
    segmenters_path=snakemake.input[0],
    rows=snakemake.params.rows,
    parquet_path=snakemake.output.parquet,
    markdown_path=snakemake.output.markdown,
)
