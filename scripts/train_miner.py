from segsynth.config import for_dataset
from segsynth.miner import train_miner
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    train_miner,
    cfg=for_dataset(snakemake.config, snakemake.wildcards.dataset)["miner"],  # params.miner without runtime keys
    data_dir=snakemake.input.data,
    generator_dir=snakemake.input.generator,
    value_model_dir=snakemake.input.value_model,
    out_dir=snakemake.output[0],
    seed=snakemake.params.seed,
    schedule=snakemake.params.schedule,
    threads=snakemake.threads,
    precision=snakemake.params.precision,
)
