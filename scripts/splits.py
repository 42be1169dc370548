from segsynth.data.adapters import prepare_dataset
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    prepare_dataset,
    name=snakemake.wildcards.dataset,
    cfg=snakemake.params.dataset,
    out_dir=snakemake.output[0],
)
