from segsynth.figures import value_distribution
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    value_distribution,
    synthetic_dirs=dict(zip(map(tuple, snakemake.params.sets), snakemake.input)),
    out_png=snakemake.output[0],
)
