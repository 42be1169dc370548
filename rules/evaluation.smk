rule evaluate_real:
    """Dice, ASD and HD95 per test case and class for the real-only model."""
    input:
        model="results/{dataset}/segmenters/{segmenter}/real",
        data="results/{dataset}/data",
    output:
        "results/{dataset}/eval/{segmenter}/real.parquet",
    log:
        "logs/{dataset}/eval/{segmenter}/real.log",
    benchmark:
        "benchmarks/{dataset}/eval/{segmenter}/real.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        runtime=30,
        mem_mb=4000,
    script:
        "../scripts/evaluate.py"


rule evaluate_augmented:
    """Dice, ASD and HD95 per test case and class for a real+synthetic model."""
    input:
        model="results/{dataset}/segmenters/{segmenter}/{generator}/{method}/seed{seed}",
        data="results/{dataset}/data",
    output:
        "results/{dataset}/eval/{segmenter}/{generator}/{method}/seed{seed}.parquet",
    log:
        "logs/{dataset}/eval/{segmenter}/{generator}/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/eval/{segmenter}/{generator}/{method}/seed{seed}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        runtime=30,
        mem_mb=4000,
    script:
        "../scripts/evaluate.py"


rule profile_segmenter:
    """Parameters and MACs of the real-only model at the dataset's resolution (the segmenter table)."""
    input:
        model="results/{dataset}/segmenters/{segmenter}/real",
        data="results/{dataset}/data",
    output:
        "results/{dataset}/eval/{segmenter}/profile.json",
    log:
        "logs/{dataset}/eval/{segmenter}/profile.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        runtime=15,
        mem_mb=4000,
    script:
        "../scripts/profile_segmenter.py"
