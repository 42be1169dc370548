from segsynth.evaluation import profile_segmenter
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    profile_segmenter,
    model_dir=snakemake.input.model,
    data_dir=snakemake.input.data,
    out_path=snakemake.output[0],
)
