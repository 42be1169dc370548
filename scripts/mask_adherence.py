from segsynth.evaluation import score_synthetic
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    score_synthetic,
    model_dir=snakemake.input.model,
    synthetic_dir=snakemake.input.synthetic,
    judge_dir=snakemake.input.get("judge"),
    out_path=snakemake.output[0],
)
