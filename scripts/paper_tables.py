from segsynth.paper_tables import write_paper
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_paper,
    paper=snakemake.params.paper,
    specs=snakemake.params.specs,
    manifest_path=snakemake.output[-1],
    fidelity_path=getattr(snakemake.input, "fidelity", None),
)
