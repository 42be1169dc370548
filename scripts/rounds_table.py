import pandas as pd

from segsynth.analyses import write_rounds
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    write_rounds,
    runs=pd.DataFrame(snakemake.params.runs),
    baseline=pd.DataFrame(snakemake.params.baseline),
    parquet_path=snakemake.output.parquet,
    markdown_path=snakemake.output.markdown,
    figure_path=snakemake.output.figure,
)
