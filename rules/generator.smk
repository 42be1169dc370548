rule train_generator:
    """Fine-tune the mask-to-image ControlNet generator (tiny random-init, or from_pretrained SD), or train a ViCTr
    flow generator (Stage 1 on its source dataset's splits, Stage 2 on this dataset's)."""
    input:
        data="results/{dataset}/data",
        weights=lambda wc: weight_sources(generator_entry(wc.dataset, wc.generator)),
        source=lambda wc: victr_source(generator_entry(wc.dataset, wc.generator)),
    output:
        directory("results/{dataset}/generators/{generator}"),
    # Params are what decides the result (Snakemake's rerun triggers): the job reads the whole entry, runtime
    # settings such as checkpoint_every included, from the config.
    params:
        generator=lambda wc: science("generator", generator_entry(wc.dataset, wc.generator)),
        seed=config["seeds"]["generator"],
        prompt_template=lambda wc: config["datasets"][wc.dataset].get("prompt_template", "{classes}"),
        code=code("train_generator"),
        precision=config["precision"],  # segsynth.precision: float32 on CPUs whatever it says
    log:
        "logs/{dataset}/generators/{generator}.log",
    benchmark:
        "benchmarks/{dataset}/generators/{generator}.tsv"
    conda:
        torch_env()
    threads: 2
    # Every synthesis job of the dataset waits for its generator, the longest job of most runs: start it first
    # (above the Miner's 10), not after the real-only segmenters that happen to be ready at the same time.
    priority: 20
    resources:
        gpu=1,
    script:
        "../scripts/train_generator.py"
