from pathlib import Path

from segsynth.tables import write_victr_tables
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_victr_tables,
    settings=snakemake.params.settings,
    fidelity_path=snakemake.input.fidelity,
    main_path=snakemake.input.main,
    benchmark_files=snakemake.params.benchmark_files,
    runs=snakemake.params.runs,
    out_dir=Path(snakemake.output.victr_synthesis_parquet).parent,
)
