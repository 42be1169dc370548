from segsynth.segmenters.leaf import inference_seed_stability
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    inference_seed_stability,
    model_dir=snakemake.input.model,
    data_dir=snakemake.input.data,
    seeds=snakemake.params.seeds,
    out_path=snakemake.output[0],
    threads=snakemake.threads,
)
