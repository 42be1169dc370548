from pathlib import Path

from segsynth.tables import write_law_tables
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_law_tables,
    settings=snakemake.params.settings,
    fidelity_path=snakemake.input.fidelity,
    adherence_path=snakemake.input.adherence,
    main_path=snakemake.input.main,
    generator_dirs=snakemake.params.generator_dirs,
    runs=snakemake.params.runs,
    out_dir=Path(snakemake.output.law_synthesis_parquet).parent,
)
