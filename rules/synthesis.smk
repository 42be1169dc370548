rule synthesize:
    """One synthetic set per (dataset, generator, method, seed): budget × |train| image–mask pairs."""
    input:
        unpack(synthesis_inputs),
    output:
        directory("results/{dataset}/synthetic/{generator}/{method}/seed{seed}"),
    params:
        method=synthesis_params,
    wildcard_constraints:
        method=SYNTHESIZED,
    log:
        "logs/{dataset}/synthetic/{generator}/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/synthetic/{generator}/{method}/seed{seed}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        runtime=720,
        mem_mb=8000,
    script:
        "../scripts/synthesize.py"


rule mask_adherence:
    """Mask adherence: the real-only segmenter's Dice on synthetic images against their conditioning masks."""
    input:
        synthetic="results/{dataset}/synthetic/{generator}/{method}/seed{seed}",
        model=lambda wc: f"results/{wc.dataset}/segmenters/{RUN['value_segmenter']}/real",
    output:
        "results/{dataset}/adherence/{generator}/{method}/seed{seed}.parquet",
    log:
        "logs/{dataset}/adherence/{generator}/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/adherence/{generator}/{method}/seed{seed}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        runtime=30,
        mem_mb=4000,
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
    log:
        "logs/{dataset}/synthetic/{generator}/{method}_ls{tau}/seed{seed}.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        runtime=10,
        mem_mb=2000,
    script:
        "../scripts/adversarial_subset.py"
