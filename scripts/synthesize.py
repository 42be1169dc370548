from segsynth.config import method_params
from segsynth.sampling.synthesize import synthesize
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    synthesize,
    generator_dir=snakemake.input.generator,
    data_dir=snakemake.input.data,
    method=snakemake.wildcards.method,
    # params.method without runtime keys (the batch size)
    params=method_params(snakemake.config, snakemake.wildcards.dataset, snakemake.wildcards.method),
    seed=int(snakemake.wildcards.seed),
    out_dir=snakemake.output[0],
    value_model_dir=snakemake.input.value_model,
    threads=snakemake.threads,
    precision=snakemake.params.precision,
    miner_dir=snakemake.input.get("miner"),
    candidates_dir=snakemake.input.get("candidates"),  # GAUDA's first candidates: the run's RD set
    mask_vae_dir=snakemake.input.get("mask_vae"),  # p_ω(m | c) of mask_source: cvae
)
