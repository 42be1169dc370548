rule train_generator:
    """Fine-tune the mask-to-image ControlNet generator (tiny random-init, or from_pretrained SD)."""
    input:
        data="results/{dataset}/data",
    output:
        directory("results/{dataset}/generators/{generator}"),
    params:
        generator=lambda wc: canonical(config["generators"][wc.generator]),
        seed=config["seeds"]["generator"],
        prompt_template=lambda wc: config["datasets"][wc.dataset].get("prompt_template", "{classes}"),
    log:
        "logs/{dataset}/generators/{generator}.log",
    benchmark:
        "benchmarks/{dataset}/generators/{generator}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        runtime=720,
        mem_mb=16000,
    script:
        "../scripts/train_generator.py"
