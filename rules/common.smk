# Shared names, wildcard constraints and input functions. No logic beyond choosing files.

import re
from pathlib import Path

from segsynth.config import (budget_methods, budget_name, budget_seeds, budget_sources, candidate_source,
                             canonical, check_references, dataset_sources, for_dataset, method_params,
                             miner_schedule, own_budget, round_methods, round_name, round_previous, science,
                             subset_name, synthesizes, trains_on, used_methods, victr_stage1, victr_stage1_generator,
                             victr_stage1_settings, weight_sources)
from segsynth.papers import (PAPERS, PAPER_ITEMS, VGD_TABLE1_ROWS, VGD_TABLE3_ROWS, VGD_FIG7_ROWS,
                             MINER_BACKBONE_ROWS, item_outputs)
from segsynth.provenance import code_version

check_references(config)
# The budget sweep's entries are ordinary methods (``rd_x2`` = rd at 2 × |train|).
config["methods"].update(budget_methods(config))
# So are the synthesize–train rounds' (``vgd_round2`` = vgd guided by round 1's real + synthetic model).
config["methods"].update(round_methods(config))

RUN = config["run"]
SEEDS = list(range(config["seeds"]["n_seed"]))
NAME = "[A-Za-z0-9][A-Za-z0-9_-]*"
ANALYSES = config.get("analyses") or {}
BUDGET = ANALYSES.get("budget")
SUBSETS = ANALYSES.get("subsets")
SYNTHETIC_ONLY = ANALYSES.get("synthetic_only")
LAW = ANALYSES.get("law")
ORDER_ABLATION = ANALYSES.get("order")
VICTR_TABLES = ANALYSES.get("victr")
LEAF_TABLES = ANALYSES.get("leaf")
CROSS_DOMAIN = ANALYSES.get("cross_domain")
ROUNDS = ANALYSES.get("rounds")
ROUND_PREVIOUS = round_previous(config)
# Synthesis jobs exist for configured methods only; other names under synthetic/ are adversariality subsets.
SYNTHESIZED = "|".join(re.escape(m) for m in sorted(config["methods"], key=len, reverse=True))
# Nested budget sets: on the sweep's seeds, a swept method's smaller budgets are prefixes of its largest
# budget's set, cut by the budget_prefix jobs instead of synthesised. (?!) matches nothing (no sweep).
BUDGET_SOURCES = budget_sources(config)
BUDGET_SEEDS = budget_seeds(config)
PREFIXED = "|".join(re.escape(m) for m in sorted(BUDGET_SOURCES, key=len, reverse=True)) or "(?!)"
PREFIX_SEEDS = "|".join(str(s) for s in BUDGET_SEEDS) or "(?!)"
# File names that join two names with "_" (results/figures/samples_{dataset}_{generator}.png) split only at a
# configured dataset and generator, so names that themselves contain "_" stay unambiguous.
DATASET_NAMES = "|".join(re.escape(d) for d in sorted(config["datasets"], key=len, reverse=True))
GENERATOR_NAMES = "|".join(re.escape(g) for g in sorted(config["generators"], key=len, reverse=True))


wildcard_constraints:
    dataset=NAME,
    generator=NAME,
    segmenter=NAME,
    method=NAME,
    seed=r"\d+",
    key=r"[0-9a-f]{12}",


def code(script):
    """The code version of a rule: a hash of its script and every segsynth module the script can import, so
    editing library code reruns the rules that run it (segsynth.provenance). A rule param."""
    return code_version(Path(workflow.basedir) / "scripts" / f"{script}.py")


def torch_env():
    """The conda env of the PyTorch rules (with --sdm conda): config `torch_build`, cuda by default (it runs on
    GPU nodes and CPUs alike); `cpu` spares a CPU-only machine the CUDA download."""
    return f"../envs/torch-{config['torch_build']}.yaml"


def generator_entry(dataset, generator):
    """A generator's entry as ``dataset``'s jobs see it (its ``overrides`` merged in)."""
    return for_dataset(config, dataset)["generators"][generator]


def victr_stage1_entry(wildcards):
    """The entry of the (first) ViCTr generator whose Stage 1 is this job's."""
    return generator_entry(wildcards.dataset, victr_stage1_generator(config, wildcards.dataset, wildcards.key))


def victr_stage1_priority(wildcards):
    """Above train_generator's 20 by the number of the run's generators that wait for this Stage 1: the one the
    ablation's nine generators share starts before the Tweedie row's own."""
    path = f"results/{wildcards.dataset}/victr_stage1/{wildcards.key}.pt"
    return 20 + sum(victr_stage1(config, wildcards.dataset, g) == [path] for g in RUN["generators"])


def real_only_params(wildcards):
    """A segmenter entry's science without its protocol keys: what decides a model trained from scratch on one
    data source (the real-only model, a synthetic-only model)."""
    entry = science("segmenter", config["segmenters"][wildcards.segmenter])
    return {key: value for key, value in entry.items() if key not in SEGMENTER_PROTOCOL_KEYS}


def synthesis_params(wildcards):
    """What decides a synthetic set: the method's settings without runtime ones (the batch size)."""
    return science("synthesis", method_params(config, wildcards.dataset, wildcards.method))


def is_prefix(method, seed):
    """Whether the synthetic set of (method, seed) is cut from a larger budget's set (rule budget_prefix)."""
    return method in BUDGET_SOURCES and int(seed) in BUDGET_SEEDS


def needs_miner(method):
    return config["methods"][method]["sampler"] == "miner"


def needs_mask_vae(dataset, method):
    """Whether the method draws its masks from the mask VAE p_ω(m | c) (mask_source: cvae)."""
    return method_params(config, dataset, method).get("mask_source", "gt") == "cvae"


def mask_vae_datasets():
    """The datasets of this run with a method whose masks come from the mask VAE."""
    return [d for d in RUN["datasets"] if any(needs_mask_vae(d, m) for m in used_methods(config))]


def value_model_dir(dataset, generator, method, seed):
    previous = ROUND_PREVIOUS.get(method)
    if previous is None:
        return f"results/{dataset}/segmenters/{RUN['value_segmenter']}/real"
    return f"results/{dataset}/segmenters/{RUN['value_segmenter']}/{generator}/{previous}/seed{seed}"


def round_runs():
    """One row per (dataset, generator, round, seed) of analyses.rounds: the round's set and the evaluation of
    run.value_segmenter trained on real + that set (the next round's f_θ)."""
    if not ROUNDS:
        return []
    s = RUN["value_segmenter"]
    return [dict(dataset=d, generator=g, segmenter=s, round=r, method=round_name(ROUNDS["method"], r), seed=seed,
                 set=f"results/{d}/synthetic/{g}/{round_name(ROUNDS['method'], r)}/seed{seed}",
                 path=f"results/{d}/eval/{s}/{g}/{round_name(ROUNDS['method'], r)}/seed{seed}.parquet")
            for d in RUN["datasets"] for g in RUN["generators"] if synthesizes(config, g, ROUNDS["method"])
            for r in range(1, ROUNDS["rounds"] + 1) for seed in range(ROUNDS.get("n_seed", config["seeds"]["n_seed"]))]


def round_baselines():
    """The real-only value segmenter per dataset: the rounds' ΔDSC reference."""
    s = RUN["value_segmenter"]
    return [dict(dataset=d, segmenter=s, method="baseline", seed=config["seeds"]["segmenter"],
                 path=f"results/{d}/eval/{s}/real.parquet") for d in RUN["datasets"]]


def synthesis_inputs(wildcards):
    inputs = {
        "data": f"results/{wildcards.dataset}/data",
        "generator": f"results/{wildcards.dataset}/generators/{wildcards.generator}",
        # Every synthetic sample records its value score under the frozen real-only segmenter f_θ; a round r ≥ 2
        # of analyses.rounds is guided (and scored) by the real + synthetic model of round r − 1, same seed.
        "value_model": value_model_dir(wildcards.dataset, wildcards.generator, wildcards.method, wildcards.seed),
    }
    if needs_miner(wildcards.method):
        inputs["miner"] = (
            f"results/{wildcards.dataset}/miners/{wildcards.generator}/{RUN['value_segmenter']}"
        )
    if needs_mask_vae(wildcards.dataset, wildcards.method):
        inputs["mask_vae"] = f"results/{wildcards.dataset}/mask_vae"
    rd = candidate_source(config, wildcards.dataset, wildcards.method)
    if rd is not None:  # GAUDA's first candidates are this RD set's images: read, not sampled again
        inputs["candidates"] = f"results/{wildcards.dataset}/synthetic/{wildcards.generator}/{rd}/seed{wildcards.seed}"
    return inputs


def adherence_inputs(wildcards):
    """A synthetic set, f_θ, and the adherence judge's real-only model when the run names one."""
    inputs = {
        "synthetic": f"results/{wildcards.dataset}/synthetic/{wildcards.generator}/{wildcards.method}/seed{wildcards.seed}",
        "model": f"results/{wildcards.dataset}/segmenters/{RUN['value_segmenter']}/real",
    }
    if RUN.get("adherence_judge"):
        inputs["judge"] = f"results/{wildcards.dataset}/segmenters/{RUN['adherence_judge']}/real"
    return inputs


def augmented_runs():
    """(dataset, segmenter, generator, method, seed) of every real+synthetic segmenter the benchmark trains."""
    return [
        (d, s, g, m, seed)
        for d in RUN["datasets"]
        for s in RUN["segmenters"]
        for g in RUN["generators"]
        for m in RUN["methods"]
        if trains_with(s, g, m)
        for seed in SEEDS
    ]


def trains_with(segmenter, generator, method):
    """Whether the run trains ``segmenter`` on ``generator``'s ``method`` sets (run.generator_methods and
    run.segmenter_methods narrow the product)."""
    return synthesizes(config, generator, method) and trains_on(config, segmenter, method)


def generator_methods(generator):
    """The methods the run samples with ``generator`` (run.generator_methods narrows run.methods)."""
    return [m for m in RUN["methods"] if synthesizes(config, generator, m)]


def method_label(generator, method):
    """Methods are named alone in tables unless several generators run, then as generator:method."""
    return method if len(RUN["generators"]) == 1 else f"{generator}:{method}"


def main_runs():
    """One row per evaluated segmenter (the Baseline and every augmented run), for the main table."""
    real = baseline_runs()
    augmented = [
        dict(dataset=d, segmenter=s, method=method_label(g, m), seed=seed,
             path=f"results/{d}/eval/{s}/{g}/{m}/seed{seed}.parquet")
        for d, s, g, m, seed in augmented_runs()
    ]
    return real + augmented


def adherence_runs():
    return [
        dict(dataset=d, method=method_label(g, m), seed=seed,
             path=f"results/{d}/adherence/{g}/{m}/seed{seed}.parquet")
        for d in RUN["datasets"]
        for g in RUN["generators"]
        for m in generator_methods(g)
        for seed in SEEDS
    ]


def fidelity_runs():
    """One row per synthetic set of the main runs: its FID / KID / domain FID parquet (rule fidelity)."""
    return [
        dict(dataset=d, method=method_label(g, m), seed=seed,
             path=f"results/{d}/fidelity/{g}/{m}/seed{seed}.parquet")
        for d in RUN["datasets"]
        for g in RUN["generators"]
        for m in generator_methods(g)
        for seed in SEEDS
    ]


def segmenter_blocks():
    return [(d, s, g) for d in RUN["datasets"] for s in RUN["segmenters"] for g in RUN["generators"]]


def baseline_runs():
    return [
        dict(dataset=d, segmenter=s, method="baseline", seed=config["seeds"]["segmenter"],
             path=f"results/{d}/eval/{s}/real.parquet")
        for d in RUN["datasets"]
        for s in RUN["segmenters"]
    ]


def budget_runs():
    """One row per (block, swept method, budget, seed); the method's own budget is its main run."""
    if not BUDGET:
        return []
    seeds = range(BUDGET.get("n_seed", config["seeds"]["n_seed"]))
    return [
        dict(dataset=d, segmenter=s, method=method_label(g, m), budget=float(b), seed=seed,
             path=f"results/{d}/eval/{s}/{g}/{m if float(b) == own_budget(config, m) else budget_name(m, b)}/seed{seed}.parquet")
        for d, s, g in segmenter_blocks()
        for m in BUDGET["methods"]
        if trains_with(s, g, m)
        for b in BUDGET["budgets"]
        for seed in seeds
    ]


def subset_runs():
    """One row per (block, threshold, seed); τ = 0 is the whole set, i.e. the main run."""
    if not SUBSETS:
        return []
    m = SUBSETS["method"]
    rows = []
    for d, s, g in segmenter_blocks():
        if not trains_with(s, g, m):
            continue
        for tau in SUBSETS["thresholds"]:
            name = m if float(tau) == 0.0 else subset_name(m, tau)
            for seed in range(SUBSETS.get("n_seed", config["seeds"]["n_seed"])):
                rows.append(dict(dataset=d, segmenter=s, method=method_label(g, m), threshold=float(tau), seed=seed,
                                 path=f"results/{d}/eval/{s}/{g}/{name}/seed{seed}.parquet",
                                 synthetic=f"results/{d}/synthetic/{g}/{name}/seed{seed}"))
    return rows


def synthetic_only_runs():
    """One row per (dataset, segmenter, generator, method, seed) whose synthetic set trains a segmenter alone."""
    if not SYNTHETIC_ONLY:
        return []
    return [
        dict(dataset=d, segmenter=s, generator=g, method=m, seed=seed,
             path=f"results/{d}/synthetic_only/eval/{s}/{g}/{m}/seed{seed}.parquet")
        for d, s, g in segmenter_blocks()
        for m in SYNTHETIC_ONLY["methods"]
        if trains_with(s, g, m)
        for seed in range(SYNTHETIC_ONLY.get("n_seed", config["seeds"]["n_seed"]))
    ]


def analysis_outputs():
    outputs = []
    if SYNTHETIC_ONLY:
        outputs += ["results/tables/synthetic_only.parquet", "results/tables/synthetic_only.md"]
    if BUDGET:
        outputs += ["results/tables/budget.parquet", "results/tables/budget.md", "results/figures/budget.png"]
    if SUBSETS:
        outputs += ["results/tables/subsets.parquet", "results/tables/subsets.md"]
    if mask_vae_datasets():
        outputs += ["results/tables/mask_vae.parquet", "results/tables/mask_vae.md"]
    if LAW:
        outputs += [f"results/tables/{name}.{ext}" for name in ("law_synthesis", "law_downstream", "law_ablation")
                    for ext in ("parquet", "md")]
        if LAW.get("figure"):
            outputs += expand("results/figures/law_weights_{dataset}.png", dataset=RUN["datasets"])
    if ORDER_ABLATION:
        outputs += ["results/tables/order_ablation.parquet", "results/tables/order_ablation.md"]
    if VICTR_TABLES:
        outputs += [f"results/tables/{name}.{ext}" for name in victr_table_names() for ext in ("parquet", "md")]
    if LEAF_TABLES:
        outputs += [f"results/tables/{name}.{ext}" for name in leaf_table_names() for ext in ("parquet", "md")]
    if ROUNDS:
        outputs += ["results/tables/rounds.parquet", "results/tables/rounds.md", "results/figures/rounds.png"]
    return outputs + cross_domain_outputs()


def cross_domain_path(eval_path):
    """A model's cross-domain evaluation, beside nothing of its own dataset: results/{test}/cross_domain/{train}/
    eval/{segmenter}/{real | generator/method/seedN}.parquet for its results/{train}/eval/... path."""
    _, train, _, rest = eval_path.split("/", 3)
    return f"results/{CROSS_DOMAIN['test']}/cross_domain/{train}/eval/{rest}"


def cross_domain_outputs():
    """Every main-table model of the train dataset, scored on the test dataset (analyses.cross_domain)."""
    if not CROSS_DOMAIN:
        return []
    return [cross_domain_path(r["path"]) for r in main_runs() if r["dataset"] == CROSS_DOMAIN["train"]]


def leaf_table_names():
    return [f"leaf_{key}" for key in ("parameterisation", "lambda", "stability") if LEAF_TABLES.get(key)]


def leaf_stability_files():
    """Table 4's inputs: "dataset/segmenter" → the per-seed stability parquet of each row's real-only model."""
    segmenters = dict.fromkeys((LEAF_TABLES.get("stability") or {}).values())
    return {f"{d}/{s}": f"results/{d}/eval/{s}/stability.parquet" for d in RUN["datasets"] for s in segmenters}


def victr_table_names():
    return ["victr_synthesis", "victr_downstream"] + (["victr_ablation"] if VICTR_TABLES.get("ablation") else [])


def victr_settings():
    """What the ViCTr tables need beyond their input files: the rows, each method's sampling steps, the
    downstream segmenter, and whether labels carry the generator."""
    rows = {**VICTR_TABLES["synthesis"], **(VICTR_TABLES.get("ablation") or {})}
    return {"segmenter": VICTR_TABLES.get("segmenter") or RUN["segmenters"][0],
            "synthesis": dict(VICTR_TABLES["synthesis"]), "ablation": dict(VICTR_TABLES.get("ablation") or {}),
            "steps": {r["method"]: method_params(config, RUN["datasets"][0], r["method"])["steps"]
                      for r in rows.values()},
            "labelled": len(RUN["generators"]) > 1}


def victr_benchmarks():
    """Each ViCTr row's synthesis benchmark files (their wall seconds give the seconds per image)."""
    rows = {**VICTR_TABLES["synthesis"], **(VICTR_TABLES.get("ablation") or {})}
    return {f"{d}/{r['generator']}/{r['method']}/seed{s}": f"benchmarks/{d}/synthetic/{r['generator']}/{r['method']}/seed{s}.tsv"
            for d in RUN["datasets"] for r in rows.values() for s in SEEDS
            if not is_prefix(r["method"], s)}  # a budget prefix is cut from a larger set, not synthesised


def law_generators():
    """Every generator a LAW table row names."""
    return list(dict.fromkeys([*LAW["synthesis"].values(), *LAW["ablation"].values()]))


def law_settings():
    """What the LAW tables need to know beyond their input files: the rows, the method, the downstream
    segmenter, and whether labels carry the generator (several generators run)."""
    return {"method": LAW.get("method", "rd"), "segmenter": LAW.get("segmenter") or RUN["segmenters"][0],
            "synthesis": dict(LAW["synthesis"]), "ablation": dict(LAW["ablation"]),
            "labelled": len(RUN["generators"]) > 1}


def sample_figures():
    return expand(
        "results/figures/{figure}_{dataset}_{generator}.png",
        figure=["samples", "values"],
        dataset=RUN["datasets"],
        generator=RUN["generators"],
    )


def final_outputs():
    return [
        "results/tables/main.parquet",
        "results/tables/main.md",
        "results/tables/main.tsv",
        "results/tables/adherence.parquet",
        "results/tables/adherence.md",
        "results/tables/fidelity.parquet",
        "results/tables/fidelity.md",
        "results/tables/cost.md",
        "results/tables/segmenters.parquet",
        "results/tables/segmenters.md",
        "results/figures/dice.png",
    ] + sample_figures() + analysis_outputs()


def segmenter_runs():
    """One row per real-only model: its test metrics, its profile and its training job's benchmark file."""
    return [
        dict(dataset=d, segmenter=s, eval=f"results/{d}/eval/{s}/real.parquet",
             profile=f"results/{d}/eval/{s}/profile.json",
             benchmark=f"benchmarks/{d}/segmenters/{s}/real.tsv")
        for d in RUN["datasets"]
        for s in RUN["segmenters"]
    ]


def benchmark_files():
    """The benchmark file of every benchmarked job this run's tables depend on (the cost table's input)."""
    datasets = RUN["datasets"]
    files = {f"benchmarks/{d}/splits.tsv" for d in datasets}
    files |= {f"benchmarks/{d}/generators/{g}.tsv" for d in datasets for g in RUN["generators"]}
    # a ViCTr generator's Stage 1, and its dataset, split for it alone
    stage1 = {path for d in datasets for g in RUN["generators"] for path in victr_stage1(config, d, g)}
    files |= {str(Path("benchmarks", *Path(path).parts[1:]).with_suffix(".tsv")) for path in stage1}
    sources = {(generator_entry(d, g).get("victr") or {}).get("source") for d in datasets for g in RUN["generators"]}
    files |= {f"benchmarks/{source}/splits.tsv" for source in sources - {None}}
    segmenters = set(RUN["segmenters"]) | {RUN["value_segmenter"]} | ({RUN.get("adherence_judge")} - {None})
    files |= {f"benchmarks/{d}/segmenters/{s}/real.tsv" for d in datasets for s in segmenters}
    files |= {f"benchmarks/{d}/eval/{s}/real.tsv" for d in datasets for s in RUN["segmenters"]}
    synthesized = set()  # (dataset, generator, method, seed directory)
    for run in adherence_runs():
        d, _, g, m, seed = Path(run["path"]).with_suffix("").parts[1:]
        files.add(f"benchmarks/{d}/adherence/{g}/{m}/{seed}.tsv")
        files.add(f"benchmarks/{d}/fidelity/{g}/{m}/{seed}.tsv")  # fidelity_runs() are the same sets
        files.add(f"benchmarks/{d}/fidelity/real_features.tsv")
        synthesized.add((d, g, m, seed))
    for run in synthetic_only_runs():
        d, _, _, s, g, m, seed = Path(run["path"]).with_suffix("").parts[1:]
        files.add(f"benchmarks/{d}/synthetic_only/segmenters/{s}/{g}/{m}/{seed}.tsv")
        files.add(f"benchmarks/{d}/synthetic_only/eval/{s}/{g}/{m}/{seed}.tsv")
        synthesized.add((d, g, m, seed))
    for run in main_runs() + budget_runs() + subset_runs():
        if run["method"] == "baseline":
            continue
        d, _, s, g, m, seed = Path(run["path"]).with_suffix("").parts[1:]
        files.add(f"benchmarks/{d}/segmenters/{s}/{g}/{m}/{seed}.tsv")
        files.add(f"benchmarks/{d}/eval/{s}/{g}/{m}/{seed}.tsv")
        if m in config["methods"]:  # a synthesized set; adversariality subsets are cut from one, unbenchmarked
            synthesized.add((d, g, m, seed))
    for d, g, m, seed in list(synthesized):  # a budget prefix: its copy job, and the set it is cut from
        if is_prefix(m, seed.removeprefix("seed")):
            synthesized.discard((d, g, m, seed))
            synthesized.add((d, g, BUDGET_SOURCES[m], seed))
            files.add(f"benchmarks/{d}/budget_prefix/{g}/{m}/{seed}.tsv")
    files |= {f"benchmarks/{d}/synthetic/{g}/{m}/{seed}.tsv" for d, g, m, seed in synthesized}
    files |= {f"benchmarks/{d}/miners/{g}/{RUN['value_segmenter']}.tsv"
              for d, g, m, _ in synthesized if needs_miner(m)}
    files |= {f"benchmarks/{d}/mask_vae.tsv" for d, g, m, _ in synthesized if needs_mask_vae(d, m)}
    return sorted(files)


# ---- the papers' targets (rules/papers.smk) ----



def _methods_spec(rows, reference, preset, segmenters=None):
    """A methods table over the run's evaluated models; ``rows``: label → "baseline", a method (of the first
    generator) or a (generator, method) pair; ``reference``: the label of the row the paired tests compare with;
    rows the run lacks say why, and every row does when the reference is missing."""
    first = RUN["generators"][0]
    pairs = {label: ("", m) if m == "baseline" else (m if isinstance(m, tuple) else (first, m))
             for label, m in rows.items()}
    labels = {label: "baseline" if m == "baseline" else method_label(g, m) for label, (g, m) in pairs.items()}

    def why(generator, method):
        if method == "baseline":
            return None
        if method not in RUN["methods"]:
            return f"`{method}` is not in this run's run.methods ({preset} runs it)"
        if generator not in RUN["generators"]:
            return f"generator `{generator}` is not in this run's run.generators ({preset} trains it)"
        if not synthesizes(config, generator, method):
            return f"this run samples `{method}` with other generators than `{generator}` (run.generator_methods)"
        return None

    absent = {labels[label]: why(*pair) for label, pair in pairs.items() if why(*pair)}
    if labels[reference] in absent:
        absent = {key: f"the reference row {reference} is not in this run ({preset} runs it)"
                  for key in labels.values()}
    wanted = {pair for label, pair in pairs.items() if labels[label] not in absent}
    segmenters = segmenters or RUN["segmenters"]
    augmented = [dict(dataset=d, segmenter=s, method=method_label(g, m), seed=seed,
                      path=f"results/{d}/eval/{s}/{g}/{m}/seed{seed}.parquet")
                 for d, s, g, m, seed in augmented_runs() if (g, m) in wanted and s in segmenters]
    # a segmenter the run trains on real data only (run.segmenter_methods) has no column in a methods table
    blocks = {(r["dataset"], r["segmenter"]) for r in augmented}
    runs = [r for r in baseline_runs() if ("", "baseline") in wanted and r["segmenter"] in segmenters
            and (not blocks or (r["dataset"], r["segmenter"]) in blocks)] + augmented
    return dict(kind="methods", rows=labels, reference=labels[reference], absent=absent, runs=runs,
                sources=["results/tables/fidelity.parquet"] + [r["path"] for r in runs])


def _law_downstream_spec():
    """LAW Table 2 with its paired tests: real only, and real + each weighting's RD sets."""
    rows = {"Real only": "baseline",
            **{f"+ {label}": (g, LAW.get("method", "rd")) for label, g in LAW["synthesis"].items()}}
    return _methods_spec(rows, "Real only", "presets/law.yaml", [LAW.get("segmenter") or RUN["segmenters"][0]])


def _victr_downstream_spec():
    """ViCTr Table 3 with its paired tests against the first DDIM-generator row."""
    rows = {label: (r["generator"], r["method"]) for label, r in VICTR_TABLES["synthesis"].items()}
    reference = next((label for label, (g, _) in rows.items() if "victr" not in config["generators"][g]),
                     next(iter(rows)))
    return _methods_spec(rows, reference, "presets/victr.yaml", [VICTR_TABLES.get("segmenter") or RUN["segmenters"][0]])


def _cross_domain_spec():
    """The Miner paper's cross-domain table: the train dataset's Baseline, RD and Miner models (every segmenter,
    every seed) scored on the test dataset's test split (rule evaluate_cross_domain)."""
    spec = _methods_spec(MINER_BACKBONE_ROWS, "RD", "config.yaml")
    train, test = CROSS_DOMAIN["train"], CROSS_DOMAIN["test"]
    runs = [dict(r, dataset=f"{train} → {test}", path=cross_domain_path(r["path"]))
            for r in spec["runs"] if r["dataset"] == train]
    return dict(spec, runs=runs, fidelity=False, sources=[r["path"] for r in runs])


def _view(name):
    return dict(kind="view", table=f"results/tables/{name}.parquet", markdown=f"results/tables/{name}.md",
                sources=[f"results/tables/{name}.parquet", f"results/tables/{name}.md"])


def _figure(path):
    return dict(kind="figure", figures=[path], sources=[path])


def _missing(reason):
    return dict(kind="missing", reason=reason, sources=[])


def paper_item_spec(paper, stem):
    """What this run's config makes of one paper item (segsynth.papers.PAPER_ITEMS)."""
    d0, g0 = RUN["datasets"][0], RUN["generators"][0]
    if paper == "vgd":
        if stem == "table1":
            return _methods_spec(VGD_TABLE1_ROWS, "Baseline", "presets/vgd_table1.yaml")
        if stem == "table3":
            return _methods_spec(VGD_TABLE3_ROWS, "VGD (all components)", "presets/vgd_ablation.yaml")
        if stem == "fig4":
            return _figure(f"results/figures/samples_{d0}_{g0}.png")
        if stem == "fig5":
            if ROUNDS:
                return dict(_figure("results/figures/rounds.png"),
                            sources=["results/figures/rounds.png", "results/tables/rounds.parquet"])
            return _missing("analyses.rounds is off in this run (e.g. rounds: {method: vgd, rounds: 4}, the paper's four)")
        if stem == "fig7":
            return _methods_spec(VGD_FIG7_ROWS, "RD", "presets/vgd_ablation.yaml")
    if paper == "miner":
        if stem == "backbones":
            return _methods_spec(MINER_BACKBONE_ROWS, "RD", "config.yaml")
        if stem == "subsets":
            return _view("subsets") if SUBSETS else _missing("analyses.subsets is off in this run "
                                                              "(presets/miner_analyses.yaml runs it)")
        if stem == "budget":
            return _view("budget") if BUDGET else _missing("analyses.budget is off in this run "
                                                            "(presets/miner_analyses.yaml runs it)")
        if stem == "overhead":
            return _view("cost")
        if stem == "cross_domain":
            return _cross_domain_spec() if CROSS_DOMAIN else _missing(
                "analyses.cross_domain is off in this run (e.g. cross_domain: {train: mni152, test: mni152_coronal})")
    if paper == "law_order":
        law = {"law_table1": "law_synthesis", "law_table2": "law_downstream", "law_table4": "law_ablation"}
        if stem == "law_table2" and LAW:
            return _law_downstream_spec()
        if stem in law:
            return _view(law[stem]) if LAW else _missing("analyses.law is off in this run (presets/law.yaml)")
        if stem == "law_fig4":
            if LAW and LAW.get("figure"):
                return _figure(f"results/figures/law_weights_{d0}.png")
            return _missing("analyses.law.figure is off in this run (presets/law.yaml)")
        if stem == "order_table3":
            return _view("segmenters")
        if stem == "order_table5_6":
            return _view("order_ablation") if ORDER_ABLATION else _missing(
                "analyses.order is off in this run (presets/segmenters.yaml)")
    if paper == "leaf":
        key = {"table2": "parameterisation", "table3": "lambda", "table4": "stability"}[stem]
        if LEAF_TABLES and LEAF_TABLES.get(key):
            return _view(f"leaf_{key}")
        return _missing(f"analyses.leaf.{key} is off in this run (presets/leaf.yaml)")
    if paper == "victr":
        name = {"table2": "victr_synthesis", "table3": "victr_downstream", "table4": "victr_ablation"}[stem]
        if VICTR_TABLES and stem == "table3":
            return _victr_downstream_spec()
        if VICTR_TABLES and name in victr_table_names():
            return _view(name)
        preset = "presets/victr_ablation.yaml" if stem == "table4" else "presets/victr.yaml"
        return _missing(f"analyses.victr{'.ablation' if stem == 'table4' else ''} is off in this run ({preset})")
    raise ValueError(f"no paper item {paper}/{stem}")


def paper_specs(paper):
    return [dict(paper_item_spec(paper, stem), stem=stem, label=label, title=title)
            for p, stem, label, title in PAPER_ITEMS if p == paper]


def paper_inputs(specs):
    """The DAG outputs a paper's items (``paper_specs``) read; the fidelity table by name (the methods tables' FID
    columns)."""
    fidelity = "results/tables/fidelity.parquet"
    sources = sorted({source for spec in specs for source in spec["sources"]} - {fidelity})
    needs_fidelity = any(s["kind"] == "methods" and s.get("fidelity", True) for s in specs)
    return dict(sources=sources, **({"fidelity": fidelity} if needs_fidelity else {}))


def paper_outputs(paper, specs, for_report=False):
    """Each item's files and the paper's manifest; with ``for_report``, the item's table or figure is marked for
    the Snakemake report under the paper (category) and the item (subcategory)."""
    files = []
    for spec in specs:
        shown, *rest = item_outputs(paper, spec["stem"], spec["kind"])
        if for_report:
            shown = report(shown, caption="../report/paper_item.rst", category=PAPERS[paper].split(":")[0],
                           subcategory=f"{spec['label']}: {spec['title']}",
                           labels={"item": spec["label"], "kind": spec["kind"]})
        files += [shown, *rest]
    return files + [f"results/papers/{paper}/manifest.json"]
