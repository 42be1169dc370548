# The figure is drawn here, not in segsynth.law: generator training imports segsynth.law, and a plotting
# dependency there would make every edit of the tables rerun the generators (segsynth.provenance.code_version).
from segsynth.data.canonical import read_meta
from segsynth.figures import law_weight_figure
from segsynth.law import law_maps
from segsynth.workflow import run_logged


def write_law_figure(generator_dir, data_dir, out_png):
    """LAW's Figs. 4 and 8: the learned δ and final weight maps of a trained LAW generator."""
    law_weight_figure(law_maps(generator_dir, data_dir), read_meta(data_dir)["class_names"], out_png)


run_logged(
    snakemake,
    write_law_figure,
    generator_dir=snakemake.input.generator,
    data_dir=snakemake.input.data,
    out_png=snakemake.output[0],
)
