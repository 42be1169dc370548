from segsynth.paper_tables import write_index
from segsynth.workflow import run_logged

run_logged(snakemake, write_index, manifest_paths=list(snakemake.input), out_path=snakemake.output[0])
