rule train_mask_vae:
    """Train p_ω(m | c), the class-conditioned mask VAE that methods with mask_source: cvae draw their masks
    from (checkpoints every mask_vae.checkpoint_every steps; a restarted job resumes); writes the quality of its
    samples against the training masks beside the weights."""
    input:
        data="results/{dataset}/data",
    output:
        directory("results/{dataset}/mask_vae"),
    params:
        mask_vae=science("mask_vae", config.get("mask_vae") or {}),  # the job reads checkpoint_every from the config
        seed=config["seeds"]["generator"],
        code=code("train_mask_vae"),
    log:
        "logs/{dataset}/mask_vae.log",
    benchmark:
        "benchmarks/{dataset}/mask_vae.tsv"
    conda:
        torch_env()
    threads: 1
    resources:
        gpu=1,
    script:
        "../scripts/train_mask_vae.py"


rule synthesize:
    """One synthetic set per (dataset, generator, method, seed): budget × |train| image–mask pairs."""
    input:
        unpack(synthesis_inputs),
    output:
        directory("results/{dataset}/synthetic/{generator}/{method}/seed{seed}"),
    params:
        method=synthesis_params,  # the job reads the batch size from the config
        code=code("synthesize"),
        precision=config["precision"],  # segsynth.precision: float32 on CPUs whatever it says
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


# A set of the budget sweep that is a prefix of a larger one is copied, not synthesised (see budget_prefix).
ruleorder: budget_prefix > synthesize


rule budget_prefix:
    """A smaller budget of the budget sweep, on the sweep's seeds: the first round(b × |train|) samples of the same
    method's largest-budget set — the masks, noise seeds and images a synthesis at budget b draws — renamed."""
    input:
        source=lambda wc: f"results/{wc.dataset}/synthetic/{wc.generator}/{BUDGET_SOURCES[wc.method]}/seed{wc.seed}",
        data="results/{dataset}/data",
    output:
        directory("results/{dataset}/synthetic/{generator}/{method}/seed{seed}"),
    params:
        method=synthesis_params,  # what decides the set, as for its synthesis job
        code=code("budget_prefix"),
    wildcard_constraints:
        method=PREFIXED,
        seed=PREFIX_SEEDS,
    log:
        "logs/{dataset}/budget_prefix/{generator}/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/budget_prefix/{generator}/{method}/seed{seed}.tsv"
    conda:
        "../envs/tables.yaml"
    threads: 1
    script:
        "../scripts/budget_prefix.py"


rule mask_adherence:
    """Mask adherence: the real-only f_θ's and the adherence judge's Dice on synthetic images against their
    conditioning masks."""
    input:
        unpack(adherence_inputs),
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
