from pathlib import Path

from segsynth.tables import write_leaf_tables
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_leaf_tables,
    segmenters_path=snakemake.input.segmenters,
    settings=snakemake.params.settings,
    stability_files=snakemake.params.stability_files,
    out_dir=Path(snakemake.output[0]).parent,
)
