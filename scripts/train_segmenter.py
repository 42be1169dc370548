from segsynth.segmenters import train_segmenter
from segsynth.workflow import run_logged

run_logged(
    snakemake,
    train_segmenter,
    cfg=snakemake.config["segmenters"][snakemake.wildcards.segmenter],  # params.segmenter without runtime keys
    data_dir=snakemake.input.data,
    out_dir=snakemake.output[0],
    seed=snakemake.params.seed,
    synthetic_dirs=[snakemake.input.synthetic] if "synthetic" in snakemake.input.keys() else [],
    threads=snakemake.threads,
    precision=snakemake.params.precision,
    # protocol continue: the real-only model to start from (an empty input for scratch)
    init_dir=(snakemake.input.init or None) if "init" in snakemake.input.keys() else None,
    # rule train_segmenter_synthetic_only: the synthetic set alone
    include_real=snakemake.params.get("include_real", True),
)
