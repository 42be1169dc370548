# Shared names, wildcard constraints and input functions. No logic beyond choosing files.

import re
from pathlib import Path

from segsynth.config import (budget_methods, budget_name, budget_seeds, budget_sources, candidate_source,
                             canonical, check_references, dataset_sources, method_params, miner_schedule, science,
                             subset_name, used_methods, victr_source, weight_sources)
from segsynth.provenance import code_version

check_references(config)
# The budget sweep's entries are ordinary methods (``rd_x2`` = rd at 2 × |train|).
config["methods"].update(budget_methods(config))

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


def code(script):
    """The code version of a rule: a hash of its script and every segsynth module the script can import, so
    editing library code reruns the rules that run it (segsynth.provenance). A rule param."""
    return code_version(Path(workflow.basedir) / "scripts" / f"{script}.py")


def torch_env():
    """The conda env of the PyTorch rules (with --sdm conda): config `torch_build`, cuda by default (it runs on
    GPU nodes and CPUs alike); `cpu` spares a CPU-only machine the CUDA download."""
    return f"../envs/torch-{config['torch_build']}.yaml"


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


def synthesis_inputs(wildcards):
    inputs = {
        "data": f"results/{wildcards.dataset}/data",
        "generator": f"results/{wildcards.dataset}/generators/{wildcards.generator}",
        # Every synthetic sample records its value score under the frozen real-only segmenter f_θ.
        "value_model": f"results/{wildcards.dataset}/segmenters/{RUN['value_segmenter']}/real",
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
        for seed in SEEDS
    ]


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
        for m in RUN["methods"]
        for seed in SEEDS
    ]


def fidelity_runs():
    """One row per synthetic set of the main runs: its FID / KID / domain FID parquet (rule fidelity)."""
    return [
        dict(dataset=d, method=method_label(g, m), seed=seed,
             path=f"results/{d}/fidelity/{g}/{m}/seed{seed}.parquet")
        for d in RUN["datasets"]
        for g in RUN["generators"]
        for m in RUN["methods"]
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
    """One row per (block, swept method, budget, seed); budget 1 is the method's main run."""
    if not BUDGET:
        return []
    seeds = range(BUDGET.get("n_seed", config["seeds"]["n_seed"]))
    return [
        dict(dataset=d, segmenter=s, method=method_label(g, m), budget=float(b), seed=seed,
             path=f"results/{d}/eval/{s}/{g}/{m if float(b) == 1.0 else budget_name(m, b)}/seed{seed}.parquet")
        for d, s, g in segmenter_blocks()
        for m in BUDGET["methods"]
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
    return outputs


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
            for d in RUN["datasets"] for r in rows.values() for s in SEEDS}


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
    # a ViCTr generator's Stage-1 dataset is split for it alone
    sources = {(config["generators"][g].get("victr") or {}).get("source") for g in RUN["generators"]} - {None}
    files |= {f"benchmarks/{source}/splits.tsv" for source in sources}
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
