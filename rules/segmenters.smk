rule train_segmenter_real:
    """Real-only downstream model: the Baseline row, and the frozen value estimator f_θ of guided samplers."""
    input:
        data="results/{dataset}/data",
    output:
        directory("results/{dataset}/segmenters/{segmenter}/real"),
    params:
        segmenter=lambda wc: canonical(config["segmenters"][wc.segmenter]),
        seed=config["seeds"]["segmenter"],
    log:
        "logs/{dataset}/segmenters/{segmenter}/real.log",
    benchmark:
        "benchmarks/{dataset}/segmenters/{segmenter}/real.tsv"
    conda:
        "../envs/torch.yaml"
    # Two threads: this job is alone on the critical path (everything downstream waits for f_θ).
    threads: 2
    resources:
        gpu=1,
        runtime=720,
        mem_mb=8000,
    script:
        "../scripts/train_segmenter.py"


rule train_segmenter_augmented:
    """Downstream model trained on real + one synthetic set (same initialisation seed as the Baseline)."""
    input:
        data="results/{dataset}/data",
        synthetic="results/{dataset}/synthetic/{generator}/{method}/seed{seed}",
    output:
        directory("results/{dataset}/segmenters/{segmenter}/{generator}/{method}/seed{seed}"),
    params:
        segmenter=lambda wc: canonical(config["segmenters"][wc.segmenter]),
        seed=config["seeds"]["segmenter"],
    log:
        "logs/{dataset}/segmenters/{segmenter}/{generator}/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/segmenters/{segmenter}/{generator}/{method}/seed{seed}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        runtime=720,
        mem_mb=8000,
    script:
        "../scripts/train_segmenter.py"
