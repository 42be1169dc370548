rule splits:
    """Ingest a dataset through its adapter into the canonical format, split train/test by case."""
    output:
        directory("results/{dataset}/data"),
    params:
        dataset=lambda wc: canonical(config["datasets"][wc.dataset]),
    log:
        "logs/{dataset}/splits.log",
    benchmark:
        "benchmarks/{dataset}/splits.tsv"
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        runtime=30,
        mem_mb=4000,
    script:
        "../scripts/splits.py"
