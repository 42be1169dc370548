rule train_segmenter_real:
    """Real-only downstream model: the Baseline row, and the frozen value estimator f_θ of guided samplers."""
    input:
        data="results/{dataset}/data",
        weights=lambda wc: weight_sources(config["segmenters"][wc.segmenter]),
    output:
        directory("results/{dataset}/segmenters/{segmenter}/real"),
    params:
        # the job reads runtime settings (checkpoint_every, data_workers) from the config
        segmenter=lambda wc: science("segmenter", config["segmenters"][wc.segmenter]),
        seed=config["seeds"]["segmenter"],
        code=code("train_segmenter"),
    log:
        "logs/{dataset}/segmenters/{segmenter}/real.log",
    benchmark:
        "benchmarks/{dataset}/segmenters/{segmenter}/real.tsv"
    conda:
        torch_env()
    # Two threads: this job is alone on the critical path (everything downstream waits for f_θ).
    threads: 2
    resources:
        gpu=1,
    script:
        "../scripts/train_segmenter.py"


rule train_segmenter_augmented:
    """Downstream model trained on real + one synthetic set (same initialisation seed as the Baseline)."""
    input:
        data="results/{dataset}/data",
        synthetic="results/{dataset}/synthetic/{generator}/{method}/seed{seed}",
        weights=lambda wc: weight_sources(config["segmenters"][wc.segmenter]),
    output:
        directory("results/{dataset}/segmenters/{segmenter}/{generator}/{method}/seed{seed}"),
    params:
        # the job reads runtime settings (checkpoint_every, data_workers) from the config
        segmenter=lambda wc: science("segmenter", config["segmenters"][wc.segmenter]),
        seed=config["seeds"]["segmenter"],
        code=code("train_segmenter"),
    log:
        "logs/{dataset}/segmenters/{segmenter}/{generator}/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/segmenters/{segmenter}/{generator}/{method}/seed{seed}.tsv"
    conda:
        torch_env()
    threads: 1
    resources:
        gpu=1,
    script:
        "../scripts/train_segmenter.py"
