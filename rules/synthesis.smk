rule synthesize:
    """One synthetic set per (dataset, generator, method, seed): budget × |train| image–mask pairs."""
    input:
        unpack(synthesis_inputs),
    output:
        directory("results/{dataset}/synthetic/{generator}/{method}/seed{seed}"),
    params:
        method=synthesis_params,  # the job reads the batch size from the config
        code=code("synthesize"),
    wildcard_constraints:
        method=SYNTHESIZED,
    log:
        "logs/{dataset}/synthetic/{generator}/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/synthetic/{generator}/{method}/seed{seed}.tsv"
    conda:
        torch_env()
    threads: 1
    resources:
        gpu=1,
    script:
        "../scripts/synthesize.py"


rule mask_adherence:
    """Mask adherence: the real-only segmenter's Dice on synthetic images against their conditioning masks."""
    input:
        synthetic="results/{dataset}/synthetic/{generator}/{method}/seed{seed}",
        model=lambda wc: f"results/{wc.dataset}/segmenters/{RUN['value_segmenter']}/real",
    output:
        "results/{dataset}/adherence/{generator}/{method}/seed{seed}.parquet",
    params:
        code=code("mask_adherence"),
    log:
        "logs/{dataset}/adherence/{generator}/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/adherence/{generator}/{method}/seed{seed}.tsv"
    conda:
        torch_env()
    threads: 1
    script:
        "../scripts/mask_adherence.py"


rule adversarial_subset:
    """The samples of one synthetic set with ℓ_seg > τ under f_θ (the Miner paper's subset analysis)."""
    input:
        "results/{dataset}/synthetic/{generator}/{method}/seed{seed}",
    output:
        directory("results/{dataset}/synthetic/{generator}/{method}_ls{tau}/seed{seed}"),
    wildcard_constraints:
        method=SYNTHESIZED,
        tau=r"\d+(p\d+)?",
    params:
        threshold=lambda wc: float(wc.tau.replace("p", ".")),
        code=code("adversarial_subset"),
    log:
        "logs/{dataset}/synthetic/{generator}/{method}_ls{tau}/seed{seed}.log",
    conda:
        "../envs/tables.yaml"
    threads: 1
    script:
        "../scripts/adversarial_subset.py"
