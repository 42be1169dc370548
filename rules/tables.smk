localrules:
    main_table,
    cost_table,
    adherence_table,
    dice_figure,
    sample_figure,
    value_figure,


rule main_table:
    """Baseline and every method: per-class metric means per run (parquet) and the paper's layout (md, tsv)."""
    input:
        [run["path"] for run in main_runs()],
    output:
        parquet="results/tables/main.parquet",
        markdown="results/tables/main.md",
        tsv=report(
            "results/tables/main.tsv",
            caption="../report/main.rst",
            category="Tables",
            labels={"table": "main"},
        ),
    params:
        runs=main_runs(),
    log:
        "logs/tables/main.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/main_table.py"


rule adherence_table:
    """Mask adherence of every synthetic set (the LAW paper's criterion for a generator that matters)."""
    input:
        [run["path"] for run in adherence_runs()],
    output:
        parquet="results/tables/adherence.parquet",
        markdown=report(
            "results/tables/adherence.md",
            caption="../report/adherence.rst",
            category="Tables",
            labels={"table": "mask adherence"},
        ),
    params:
        runs=adherence_runs(),
    log:
        "logs/tables/adherence.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/adherence_table.py"


rule dice_figure:
    """Dice per method, mean ± std over seeds with one point per seed."""
    input:
        "results/tables/main.parquet",
    output:
        report(
            "results/figures/dice.png",
            caption="../report/dice.rst",
            category="Figures",
            labels={"figure": "Dice per method"},
        ),
    log:
        "logs/figures/dice.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/dice_figure.py"


rule sample_figure:
    """Real image–mask pairs next to the synthetic images each method drew for the same masks (seed 0)."""
    input:
        data="results/{dataset}/data",
        synthetic=lambda wc: expand(
            "results/{dataset}/synthetic/{generator}/{method}/seed0",
            dataset=wc.dataset,
            generator=wc.generator,
            method=RUN["methods"],
        ),
    output:
        report(
            "results/figures/samples_{dataset}_{generator}.png",
            caption="../report/samples.rst",
            category="Figures",
            labels={"figure": "samples", "dataset": "{dataset}", "generator": "{generator}"},
        ),
    params:
        methods=RUN["methods"],
    log:
        "logs/figures/samples_{dataset}_{generator}.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/sample_figure.py"


rule cost_table:
    """What the run cost: per stage, wall seconds and peak memory from the jobs' benchmark files."""
    input:
        # Runs last: after every evaluated model and every synthetic set.
        "results/tables/main.parquet",
        "results/tables/adherence.parquet",
    output:
        parquet="results/tables/cost.parquet",
        markdown=report(
            "results/tables/cost.md",
            caption="../report/cost.rst",
            category="Tables",
            labels={"table": "cost"},
        ),
    params:
        benchmarks="benchmarks",
    log:
        "logs/tables/cost.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/cost_table.py"


rule value_figure:
    """Distribution of the per-sample value score under f_θ for every method (VGD paper, Fig. 1 and 5a)."""
    input:
        lambda wc: expand(
            "results/{dataset}/synthetic/{generator}/{method}/seed{seed}",
            dataset=wc.dataset,
            generator=wc.generator,
            method=RUN["methods"],
            seed=SEEDS,
        ),
    output:
        report(
            "results/figures/values_{dataset}_{generator}.png",
            caption="../report/values.rst",
            category="Figures",
            labels={"figure": "value distribution", "dataset": "{dataset}", "generator": "{generator}"},
        ),
    params:
        sets=[(m, s) for m in RUN["methods"] for s in SEEDS],
    log:
        "logs/figures/values_{dataset}_{generator}.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/value_figure.py"
