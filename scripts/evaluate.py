from segsynth.evaluation import evaluate_segmenter
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    evaluate_segmenter,
    model_dir=snakemake.input.model,
    data_dir=snakemake.input.data,
    out_path=snakemake.output[0],
    threads=snakemake.threads,
)
