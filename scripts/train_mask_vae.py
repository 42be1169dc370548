from segsynth.mask_vae import train_mask_vae
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    train_mask_vae,
    cfg=snakemake.config.get("mask_vae"),  # params.mask_vae without runtime keys
    data_dir=snakemake.input.data,
    out_dir=snakemake.output[0],
    seed=snakemake.params.seed,
    threads=snakemake.threads,
)
