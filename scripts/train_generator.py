from segsynth.generator.train import train_generator
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    train_generator,
    cfg=snakemake.config["generators"][snakemake.wildcards.generator],  # params.generator without runtime keys
    data_dir=snakemake.input.data,
    out_dir=snakemake.output[0],
    seed=snakemake.params.seed,
    prompt_template=snakemake.params.prompt_template,
    threads=snakemake.threads,
    precision=snakemake.params.precision,
)
