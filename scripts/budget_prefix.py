from segsynth.analyses import budget_prefix
from segsynth.config import method_params
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    budget_prefix,
    source_dir=snakemake.input.source,
    data_dir=snakemake.input.data,
    method=snakemake.wildcards.method,
    # the method's settings as its synthesis job would record them (batch size included)
    params=method_params(snakemake.config, snakemake.wildcards.dataset, snakemake.wildcards.method),
    seed=int(snakemake.wildcards.seed),
    out_dir=snakemake.output[0],
)
