localrules:
    main_table,
    segmenter_table,
    budget_table,
    synthetic_only_table,
    subset_table,
    budget_figure,
    cost_table,
    adherence_table,
    fidelity_table,
    dice_figure,
    sample_figure,
    value_figure,


rule main_table:
    """Baseline and every method: per-class metric means per run (parquet) and the paper's layout (md, tsv), with
    each method's fidelity and mask adherence beside its Dice."""
    input:
        runs=[run["path"] for run in main_runs()],
        fidelity="results/tables/fidelity.parquet",
        adherence="results/tables/adherence.parquet",
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
        code=code("main_table"),
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
        code=code("adherence_table"),
        runs=adherence_runs(),
        scorers={"value_model": RUN["value_segmenter"], "judge": RUN.get("adherence_judge")},
    log:
        "logs/tables/adherence.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/adherence_table.py"


rule mask_vae_table:
    """The mask VAE's samples against the training masks, per dataset and class (presence, area, Wasserstein
    distance of the area distributions, condition recall)."""
    input:
        expand("results/{dataset}/mask_vae", dataset=mask_vae_datasets()),
    output:
        parquet="results/tables/mask_vae.parquet",
        markdown=report(
            "results/tables/mask_vae.md",
            caption="../report/mask_vae.rst",
            category="Tables",
            labels={"table": "mask VAE samples"},
        ),
    params:
        code=code("mask_vae_table"),
        datasets=mask_vae_datasets(),
    log:
        "logs/tables/mask_vae.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/mask_vae_table.py"


rule fidelity_table:
    """FID, KID and the domain FID of every synthetic set, and their mean ± std over seeds per method."""
    input:
        [run["path"] for run in fidelity_runs()],
    output:
        parquet="results/tables/fidelity.parquet",
        markdown=report(
            "results/tables/fidelity.md",
            caption="../report/fidelity.rst",
            category="Tables",
            labels={"table": "fidelity"},
        ),
    params:
        code=code("fidelity_table"),
        runs=fidelity_runs(),
    log:
        "logs/tables/fidelity.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/fidelity_table.py"


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
    params:
        code=code("dice_figure"),
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
            method=generator_methods(wc.generator),
        ),
    output:
        report(
            "results/figures/samples_{dataset}_{generator}.png",
            caption="../report/samples.rst",
            category="Figures",
            labels={"figure": "samples", "dataset": "{dataset}", "generator": "{generator}"},
        ),
    params:
        code=code("sample_figure"),
        methods=lambda wc: generator_methods(wc.generator),
    wildcard_constraints:
        dataset=DATASET_NAMES,
        generator=GENERATOR_NAMES,
    log:
        "logs/figures/samples_{dataset}_{generator}.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/sample_figure.py"


rule cost_table:
    """What the run cost: per stage, wall seconds and peak memory from the jobs' benchmark files."""
    input:
        # The benchmark file of every benchmarked job of this run, and only those.
        benchmark_files(),
    output:
        parquet="results/tables/cost.parquet",
        markdown=report(
            "results/tables/cost.md",
            caption="../report/cost.rst",
            category="Tables",
            labels={"table": "cost"},
        ),
    params:
        code=code("cost_table"),
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
            method=generator_methods(wc.generator),
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
        code=code("value_figure"),
        sets=lambda wc: [(m, s) for m in generator_methods(wc.generator) for s in SEEDS],
    wildcard_constraints:
        dataset=DATASET_NAMES,
        generator=GENERATOR_NAMES,
    log:
        "logs/figures/values_{dataset}_{generator}.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/value_figure.py"


rule budget_table:
    """ΔDSC over the Baseline per swept method and synthesis budget N_s = b × |train| (Miner paper)."""
    input:
        [run["path"] for run in baseline_runs() + budget_runs()],
    output:
        parquet="results/tables/budget.parquet",
        markdown=report(
            "results/tables/budget.md",
            caption="../report/budget.rst",
            category="Tables",
            labels={"table": "synthesis budget"},
        ),
    params:
        code=code("budget_table"),
        runs=budget_runs(),
        baseline=baseline_runs(),
    log:
        "logs/tables/budget.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/budget_table.py"


rule synthetic_only_table:
    """Synthetic-only DSC and its ratio to the real-only Baseline per synthetic set (LAW paper, Table 2)."""
    input:
        [run["path"] for run in baseline_runs() + synthetic_only_runs()],
    output:
        parquet="results/tables/synthetic_only.parquet",
        markdown=report(
            "results/tables/synthetic_only.md",
            caption="../report/synthetic_only.rst",
            category="Tables",
            labels={"table": "synthetic only"},
        ),
    params:
        code=code("synthetic_only_table"),
        runs=synthetic_only_runs(),
        baselines=baseline_runs(),
    log:
        "logs/tables/synthetic_only.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/synthetic_only_table.py"


rule budget_figure:
    """ΔDSC against the synthesis budget, one line per swept method."""
    input:
        "results/tables/budget.parquet",
    output:
        report(
            "results/figures/budget.png",
            caption="../report/budget_figure.rst",
            category="Figures",
            labels={"figure": "synthesis budget"},
        ),
    params:
        code=code("budget_figure"),
    log:
        "logs/figures/budget.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/budget_figure.py"


rule subset_table:
    """Adversariality subsets: training on the samples with ℓ_seg > τ (count, share, ΔDSC, per-sample gain)."""
    input:
        evaluations=[run["path"] for run in baseline_runs() + subset_runs()],
        synthetic=[run["synthetic"] for run in subset_runs()],
    output:
        parquet="results/tables/subsets.parquet",
        markdown=report(
            "results/tables/subsets.md",
            caption="../report/subsets.rst",
            category="Tables",
            labels={"table": "adversariality subsets"},
        ),
    params:
        code=code("subset_table"),
        runs=subset_runs(),
        baseline=baseline_runs(),
    log:
        "logs/tables/subsets.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/subset_table.py"


rule segmenter_table:
    """Every segmenter side by side (params, MACs, training time, Dice/ASD/HD95), the shape of ORDER's Table 3."""
    input:
        [run[key] for run in segmenter_runs() for key in ("eval", "profile")],
    output:
        parquet="results/tables/segmenters.parquet",
        markdown=report(
            "results/tables/segmenters.md",
            caption="../report/segmenters.rst",
            category="Tables",
            labels={"table": "segmenters"},
        ),
    params:
        code=code("segmenter_table"),
        runs=segmenter_runs(),
    log:
        "logs/tables/segmenters.log",
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/segmenter_table.py"


if LAW:

    localrules:
        law_tables,

    rule law_tables:
        """LAW's Tables 1, 2 and 4: each weighting's generator, its sets' fidelity and adherence, the downstream
        segmenter's Dice and IoU, and the stability of its training — views over the DAG's own tables."""
        input:
            fidelity="results/tables/fidelity.parquet",
            adherence="results/tables/adherence.parquet",
            main="results/tables/main.parquet",
            generators=[f"results/{d}/generators/{g}" for d in RUN["datasets"] for g in law_generators()],
            evals=[run["path"] for run in main_runs()],  # per-case Dice for the paired tests
        output:
            **{f"{name}_{ext}": f"results/tables/{name}.{ext}"
               for name in ("law_synthesis", "law_downstream") for ext in ("parquet", "md")},
            law_ablation_parquet="results/tables/law_ablation.parquet",
            law_ablation_md=report(
                "results/tables/law_ablation.md",
                caption="../report/law.rst",
                category="LAW & ORDER",
                labels={"table": "LAW ablation (Table 4)"},
            ),
        params:
            code=code("law_tables"),
            settings=law_settings(),
            runs=main_runs(),
            # Table 4's stability column reads each generator's training summary (one dataset's: the first)
            generator_dirs={g: f"results/{RUN['datasets'][0]}/generators/{g}" for g in law_generators()},
        log:
            "logs/tables/law.log",
        conda:
            "../envs/tables.yaml"
        script:
            "../scripts/law_tables.py"

    rule law_figure:
        """LAW's learned δ and final weights over a few training masks (the paper's Figs. 4 and 8)."""
        input:
            generator=lambda wc: f"results/{wc.dataset}/generators/{LAW['figure']}",
            data="results/{dataset}/data",
        output:
            report(
                "results/figures/law_weights_{dataset}.png",
                caption="../report/law_figure.rst",
                category="LAW & ORDER",
                labels={"figure": "LAW weights", "dataset": "{dataset}"},
            ),
        params:
            code=code("law_figure"),
        log:
            "logs/figures/law_weights_{dataset}.log",
        conda:
            torch_env()
        script:
            "../scripts/law_figure.py"


if VICTR_TABLES:

    localrules:
        victr_tables,

    rule victr_tables:
        """ViCTr's Tables 2-4: each row's (generator, method) sets, their fidelity and seconds per image, the
        downstream segmenter's Dice and HD95 — views over the DAG's own tables and benchmark files."""
        input:
            fidelity="results/tables/fidelity.parquet",
            main="results/tables/main.parquet",
            benchmarks=list(victr_benchmarks().values()),
            evals=[run["path"] for run in main_runs()],  # per-case Dice for the paired tests
        output:
            **{f"{name}_{ext}": f"results/tables/{name}.{ext}" for name in victr_table_names()
               for ext in ("parquet", "md") if (name, ext) != ("victr_synthesis", "md")},
            victr_synthesis_md=report(
                "results/tables/victr_synthesis.md",
                caption="../report/victr.rst",
                category="ViCTr",
                labels={"table": "ViCTr synthesis (Table 2)"},
            ),
        params:
            code=code("victr_tables"),
            settings=victr_settings(),
            benchmark_files=victr_benchmarks(),
            runs=main_runs(),
        log:
            "logs/tables/victr.log",
        conda:
            "../envs/tables.yaml"
        script:
            "../scripts/victr_tables.py"


if ORDER_ABLATION:

    localrules:
        order_ablation_table,

    rule order_ablation_table:
        """ORDER's Tables 5-6: where the bidirectional skip attention sits, from the segmenter table's rows."""
        input:
            "results/tables/segmenters.parquet",
        output:
            parquet="results/tables/order_ablation.parquet",
            markdown=report(
                "results/tables/order_ablation.md",
                caption="../report/order.rst",
                category="LAW & ORDER",
                labels={"table": "ORDER attention stages (Tables 5-6)"},
            ),
        params:
            code=code("order_ablation_table"),
            rows=dict(ORDER_ABLATION["segmenters"]),
        log:
            "logs/tables/order_ablation.log",
        conda:
            "../envs/tables.yaml"
        script:
            "../scripts/order_ablation_table.py"


if LEAF_TABLES:

    localrules:
        leaf_tables,

    rule leaf_tables:
        """LEAF's Tables 2-4: parameterisation x alignment and the lambda sweep from the segmenter table's rows,
        the spread over inference seeds from the stability evaluations."""
        input:
            segmenters="results/tables/segmenters.parquet",
            stability=list(leaf_stability_files().values()),
        output:
            *[f"results/tables/{name}.{ext}" for name in leaf_table_names() for ext in ("parquet", "md")
              if (name, ext) != ("leaf_parameterisation", "md")],
            report(
                "results/tables/leaf_parameterisation.md",
                caption="../report/leaf.rst",
                category="LEAF",
                labels={"table": "LEAF parameterisation and alignment (Tables 2-4)"},
            ),
        params:
            code=code("leaf_tables"),
            settings=dict(LEAF_TABLES),
            stability_files=leaf_stability_files(),
        log:
            "logs/tables/leaf.log",
        conda:
            "../envs/tables.yaml"
        script:
            "../scripts/leaf_tables.py"


if ROUNDS:

    localrules:
        rounds_table,

    rule rounds_table:
        """VGD's synthesize–train rounds (Fig. 5): each round's set, guided by the previous round's real + synthetic
        model, its mean value and the Dice of the model trained with it."""
        input:
            sets=[run["set"] for run in round_runs()],
            evals=[run["path"] for run in round_runs()],
            baseline=[run["path"] for run in round_baselines()],
        output:
            parquet="results/tables/rounds.parquet",
            markdown="results/tables/rounds.md",
            figure=report(
                "results/figures/rounds.png",
                caption="../report/rounds.rst",
                category="Figures",
                labels={"figure": "synthesize–train rounds (VGD Fig. 5)"},
            ),
        params:
            code=code("rounds_table"),
            runs=round_runs(),
            baseline=round_baselines(),
        log:
            "logs/tables/rounds.log",
        conda:
            "../envs/tables.yaml"
        script:
            "../scripts/rounds_table.py"
