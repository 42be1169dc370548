from segsynth.fidelity import score_fidelity
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    score_fidelity,
    reference_path=snakemake.input.reference,
    synthetic_dir=snakemake.input.synthetic,
    model_dir=snakemake.input.model,
    out_path=snakemake.output[0],
    dataset=snakemake.wildcards.dataset,
    generator=snakemake.wildcards.generator,
    method=snakemake.wildcards.method,
    seed=int(snakemake.wildcards.seed),
)
