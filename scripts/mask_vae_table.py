from segsynth.tables import write_mask_vae_tables
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_mask_vae_tables,
    datasets=snakemake.params.datasets,
    mask_vae_dirs=list(snakemake.input),
    parquet_path=snakemake.output.parquet,
    markdown_path=snakemake.output.markdown,
)
