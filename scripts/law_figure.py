from segsynth.figures import law_weight_figure
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    law_weight_figure,
    generator_dir=snakemake.input.generator,
    data_dir=snakemake.input.data,
    out_png=snakemake.output[0],
)
