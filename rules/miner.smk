rule train_miner:
    """Train the Adversariality Miner M_ξ against the frozen generator and the frozen real-only segmenter f_θ
    (checkpoints every miner.checkpoint_every steps; a restarted job resumes). Requested by methods whose
    sampler is "miner"."""
    input:
        data="results/{dataset}/data",
        generator="results/{dataset}/generators/{generator}",
        value_model="results/{dataset}/segmenters/{segmenter}/real",
    output:
        directory("results/{dataset}/miners/{generator}/{segmenter}"),
    params:
        # the dataset's Miner settings (its overrides merged in); the job reads checkpoint_every from the config
        miner=lambda wc: science("miner", for_dataset(config, wc.dataset)["miner"]),
        seed=config["seeds"]["miner"],
        # the miner method's sampling schedule: training rollouts are its first miner.rollout_steps steps
        schedule=lambda wildcards: miner_schedule(config, wildcards.dataset),
        code=code("train_miner"),
        precision=config["precision"],  # segsynth.precision: float32 on CPUs whatever it says
    log:
        "logs/{dataset}/miners/{generator}/{segmenter}.log",
    benchmark:
        "benchmarks/{dataset}/miners/{generator}/{segmenter}.tsv"
    conda:
        torch_env()
    threads: 2
    # The Miner is on the critical path of every miner synthesis job: start it as soon as its inputs exist.
    priority: 10
    resources:
        gpu=1,
    script:
        "../scripts/train_miner.py"
