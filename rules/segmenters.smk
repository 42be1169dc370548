# segsynth.segmenters.protocol.PROTOCOL_KEYS, repeated here because parsing must not import torch (which
# segsynth.segmenters does); tests/test_protocol.py checks that the two agree. They only change real + synthetic
# training, so the real-only model's params leave them out: editing them never retrains the Baseline or f_θ.
SEGMENTER_PROTOCOL_KEYS = ("protocol", "continue_steps", "continue_epochs", "val_fraction", "val_every", "cutmix_p")


rule train_segmenter_real:
    """Real-only downstream model: the Baseline row, and the frozen value estimator f_θ of guided samplers."""
    input:
        data="results/{dataset}/data",
        weights=lambda wc: weight_sources(config["segmenters"][wc.segmenter]),
    output:
        directory("results/{dataset}/segmenters/{segmenter}/real"),
    params:
        # the job reads runtime settings (checkpoint_every, data_workers) from the config; without the protocol keys
        segmenter=real_only_params,
        seed=config["seeds"]["segmenter"],
        code=code("train_segmenter"),
        precision=config["precision"],  # segsynth.precision: float32 on CPUs whatever it says
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
    """Downstream model trained on real + one synthetic set: from scratch (same initialisation seed as the
    Baseline) or, for ``protocol: continue``, continued from the real-only model (input ``init``)."""
    input:
        data="results/{dataset}/data",
        synthetic="results/{dataset}/synthetic/{generator}/{method}/seed{seed}",
        weights=lambda wc: weight_sources(config["segmenters"][wc.segmenter]),
        # protocol continue: the real-only model it starts from (nothing for scratch)
        init=lambda wc: (
            f"results/{wc.dataset}/segmenters/{wc.segmenter}/real"
            if config["segmenters"][wc.segmenter].get("protocol", "scratch") == "continue"
            else []
        ),
    output:
        directory("results/{dataset}/segmenters/{segmenter}/{generator}/{method}/seed{seed}"),
    params:
        # the job reads runtime settings (checkpoint_every, data_workers) from the config
        segmenter=lambda wc: science("segmenter", config["segmenters"][wc.segmenter]),
        seed=config["seeds"]["segmenter"],
        code=code("train_segmenter"),
        precision=config["precision"],  # segsynth.precision: float32 on CPUs whatever it says
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


rule train_segmenter_synthetic_only:
    """Downstream model trained on one synthetic set alone, from scratch (the LAW paper's test of a generator:
    analyses.synthetic_only)."""
    input:
        data="results/{dataset}/data",
        synthetic="results/{dataset}/synthetic/{generator}/{method}/seed{seed}",
        weights=lambda wc: weight_sources(config["segmenters"][wc.segmenter]),
    output:
        directory("results/{dataset}/synthetic_only/segmenters/{segmenter}/{generator}/{method}/seed{seed}"),
    params:
        segmenter=real_only_params,  # scratch training whatever the protocol
        seed=config["seeds"]["segmenter"],
        include_real=False,
        code=code("train_segmenter"),
        precision=config["precision"],
    log:
        "logs/{dataset}/synthetic_only/segmenters/{segmenter}/{generator}/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/synthetic_only/segmenters/{segmenter}/{generator}/{method}/seed{seed}.tsv"
    conda:
        torch_env()
    threads: 1
    resources:
        gpu=1,
    script:
        "../scripts/train_segmenter.py"
