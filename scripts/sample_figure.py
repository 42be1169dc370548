from segsynth.figures import sample_grid
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    sample_grid,
    data_dir=snakemake.input.data,
    synthetic_dirs=dict(zip(snakemake.params.methods, snakemake.input.synthetic)),
    out_png=snakemake.output[0],
)
