rule splits:
    """Ingest a dataset through its adapter into the canonical format, split train/test by case."""
    input:
        # the raw files the adapter reads: replacing one in place reruns the split
        lambda wc: dataset_sources(config["datasets"][wc.dataset]),
    output:
        directory("results/{dataset}/data"),
    params:
        dataset=lambda wc: canonical(config["datasets"][wc.dataset]),
        code=code("splits"),
    log:
        "logs/{dataset}/splits.log",
    benchmark:
        "benchmarks/{dataset}/splits.tsv"
    conda:
        "../envs/data.yaml"
    threads: 1
    script:
        "../scripts/splits.py"
