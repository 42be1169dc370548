from segsynth.analyses import adversarial_subset
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    adversarial_subset,
    synthetic_dir=snakemake.input[0],
    threshold=snakemake.params.threshold,
    out_dir=snakemake.output[0],
)
