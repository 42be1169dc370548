import pandas as pd

from segsynth.figures import budget_plot
from segsynth.workflow import run_logged

run_logged(snakemake, budget_plot, table=pd.read_parquet(snakemake.input[0]), out_png=snakemake.output[0])
