from segsynth.fidelity import score_reference
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    score_reference,
    data_dir=snakemake.input.data,
    model_dir=snakemake.input.model,
    out_path=snakemake.output[0],
)
