# Shared names, wildcard constraints and input functions. No logic beyond choosing files.

from segsynth.config import canonical, check_references, method_params

check_references(config)

RUN = config["run"]
SEEDS = list(range(config["seeds"]["n_seed"]))
NAME = "[A-Za-z0-9][A-Za-z0-9_-]*"


wildcard_constraints:
    dataset=NAME,
    generator=NAME,
    segmenter=NAME,
    method=NAME,
    seed=r"\d+",


def synthesis_params(wildcards):
    return method_params(config, wildcards.dataset, wildcards.method)


def needs_miner(method):
    return config["methods"][method]["sampler"] == "miner"


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
    real = [
        dict(dataset=d, segmenter=s, method="baseline", seed=config["seeds"]["segmenter"],
             path=f"results/{d}/eval/{s}/real.parquet")
        for d in RUN["datasets"]
        for s in RUN["segmenters"]
    ]
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
        "results/tables/cost.md",
        "results/figures/dice.png",
    ] + sample_figures()
