import pandas as pd

from segsynth.figures import metric_plot
from segsynth.workflow import run_logged

run_logged(snakemake, metric_plot, main=pd.read_parquet(snakemake.input[0]), out_png=snakemake.output[0])
