rule train_victr_stage1:
    """ViCTr's Stage 1 (§3.3) for a dataset's ViCTr generators: flow training on the `victr.source` dataset's
    train split, then the Fisher at the result. One job per distinct Stage-1 setting (the file's key hashes
    them), so generators that differ only in Stage 2, as the ablation's do, share it."""
    input:
        source=lambda wc: f"results/{victr_stage1_entry(wc)['victr']['source']}/data",
        data="results/{dataset}/data",
        weights=lambda wc: weight_sources(victr_stage1_entry(wc)),
    output:
        "results/{dataset}/victr_stage1/{key}.pt",
    params:
        settings=lambda wc: victr_stage1_settings(victr_stage1_entry(wc)),
        seed=config["seeds"]["generator"],
        prompt_template=lambda wc: config["datasets"][wc.dataset].get("prompt_template", "{classes}"),
        code=code("train_victr_stage1"),
    log:
        "logs/{dataset}/victr_stage1/{key}.log",
    benchmark:
        "benchmarks/{dataset}/victr_stage1/{key}.tsv"
    conda:
        torch_env()
    threads: 2
    priority: victr_stage1_priority
    resources:
        gpu=1,
    script:
        "../scripts/train_victr_stage1.py"


rule train_generator:
    """Fine-tune the mask-to-image ControlNet generator (tiny random-init, or from_pretrained SD), or train a ViCTr
    flow generator's Stage 2 on this dataset's splits (from its Stage 1, train_victr_stage1's file)."""
    input:
        data="results/{dataset}/data",
        weights=lambda wc: weight_sources(generator_entry(wc.dataset, wc.generator)),
        stage1=lambda wc: victr_stage1(config, wc.dataset, wc.generator),
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
