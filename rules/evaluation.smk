rule evaluate_real:
    """Dice, ASD and HD95 per test case and class for the real-only model."""
    input:
        model="results/{dataset}/segmenters/{segmenter}/real",
        data="results/{dataset}/data",
    output:
        "results/{dataset}/eval/{segmenter}/real.parquet",
    params:
        code=code("evaluate"),
    log:
        "logs/{dataset}/eval/{segmenter}/real.log",
    benchmark:
        "benchmarks/{dataset}/eval/{segmenter}/real.tsv"
    conda:
        torch_env()
    threads: 1
    script:
        "../scripts/evaluate.py"


rule evaluate_augmented:
    """Dice, ASD and HD95 per test case and class for a real+synthetic model."""
    input:
        model="results/{dataset}/segmenters/{segmenter}/{generator}/{method}/seed{seed}",
        data="results/{dataset}/data",
    output:
        "results/{dataset}/eval/{segmenter}/{generator}/{method}/seed{seed}.parquet",
    params:
        code=code("evaluate"),
    log:
        "logs/{dataset}/eval/{segmenter}/{generator}/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/eval/{segmenter}/{generator}/{method}/seed{seed}.tsv"
    conda:
        torch_env()
    threads: 1
    script:
        "../scripts/evaluate.py"


rule profile_segmenter:
    """Parameters and MACs of the real-only model at the dataset's resolution (the segmenter table)."""
    input:
        model="results/{dataset}/segmenters/{segmenter}/real",
        data="results/{dataset}/data",
    output:
        "results/{dataset}/eval/{segmenter}/profile.json",
    params:
        code=code("profile_segmenter"),
    log:
        "logs/{dataset}/eval/{segmenter}/profile.log",
    conda:
        torch_env()
    threads: 1
    script:
        "../scripts/profile_segmenter.py"
