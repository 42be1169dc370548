from segsynth.law import write_law_figure
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_law_figure,
    generator_dir=snakemake.input.generator,
    data_dir=snakemake.input.data,
    out_png=snakemake.output[0],
)
