"""Config checks that a JSON schema cannot express, and the merging of settings for one job.

The schema (``schemas/config.schema.yaml``, applied by ``snakemake.utils.validate`` at start) checks keys,
types and ranges; ``check_references`` checks that every name the ``run`` section uses is defined.
"""

from __future__ import annotations

import copy

from pathlib import Path

import yaml

from .errors import ConfigError

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


def schema_file(schema: Path = SCHEMA) -> str:
    """The config schema as JSON, for ``snakemake.utils.validate`` at every workflow start.

    The schema is written in YAML; Snakemake parses YAML schemas with a pure-Python loader (~0.14 s per start,
    a twentieth of a paper-sized dry run). This JSON copy, kept in segsynth's cache folder under the YAML file's
    size and mtime, is parsed in milliseconds; validation and its messages are the same."""
    import json
    import os

    from .provenance import CACHE

    stat = schema.stat()
    cached = CACHE.parent / f"config.schema.{stat.st_size}.{stat.st_mtime_ns}.json"
    if not cached.exists():
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(yaml.load(schema.read_text(), Loader=loader)))
            os.replace(tmp, cached)
        except OSError:
            return str(schema)  # a read-only home: validate the YAML itself
    return str(cached)


def read_configs(paths) -> dict:
    """The config files merged in order, nested mappings merged key by key, as ``snakemake --configfile a b``
    merges them (before the schema's defaults; for tools that read a config outside a workflow run)."""
    config: dict = {}
    for path in paths:
        _merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def check_references(config: dict) -> None:
    """Every dataset, generator, segmenter and method that ``run`` names must be defined."""
    run = config["run"]
    for section in ("datasets", "generators", "segmenters", "methods"):
        for name in run[section]:
            if name not in config[section]:
                raise ConfigError(f"run.{section}", f"{name!r} is not defined under '{section}' "
                                  f"(defined: {sorted(config[section])})")
    for dataset, entry in config["datasets"].items():
        for section, update in (entry.get("overrides") or {}).items():
            for name in update if section != "miner" else ():
                if name not in config[section]:
                    raise ConfigError(f"datasets.{dataset}.overrides.{section}", f"{name!r} is not defined under "
                                      f"'{section}' (an override changes an entry, it does not add one)")
    for key, section in (("generator_methods", "generators"), ("segmenter_methods", "segmenters")):
        for name, methods in (run.get(key) or {}).items():
            if name not in run[section]:
                raise ConfigError(f"run.{key}", f"{name!r} is not in run.{section} {run[section]}")
            for method in methods:
                if method not in run["methods"]:
                    raise ConfigError(f"run.{key}.{name}", f"{method!r} is not in run.methods {run['methods']}")
    if run["value_segmenter"] not in config["segmenters"]:
        raise ConfigError("run.value_segmenter", f"{run['value_segmenter']!r} is not defined under 'segmenters'")
    judge = run.get("adherence_judge")
    if judge is not None and judge not in config["segmenters"]:
        raise ConfigError("run.adherence_judge", f"{judge!r} is not defined under 'segmenters'")
    analyses = config.get("analyses") or {}
    named = [("analyses.budget.methods", m) for m in (analyses.get("budget") or {}).get("methods", [])]
    if analyses.get("subsets"):
        named.append(("analyses.subsets.method", analyses["subsets"]["method"]))
    named += [("analyses.synthetic_only.methods", m) for m in (analyses.get("synthetic_only") or {}).get("methods", [])]
    for key, name in named:
        if name not in config["methods"]:
            raise ConfigError(key, f"{name!r} is not defined under 'methods' (defined: {sorted(config['methods'])})")
    law = analyses.get("law")
    if law:
        rows = [(f"analyses.law.{table}", generator) for table in ("synthesis", "ablation")
                for generator in law[table].values()]
        if law.get("figure"):
            rows.append(("analyses.law.figure", law["figure"]))
        for key, generator in rows:
            if generator not in run["generators"]:
                raise ConfigError(key, f"{generator!r} is not in run.generators {run['generators']}")
        if law.get("method", "rd") not in run["methods"]:
            raise ConfigError("analyses.law.method", f"{law.get('method', 'rd')!r} is not in run.methods")
        for key, generator in rows:
            if not synthesizes(config, generator, law.get("method", "rd")):
                raise ConfigError("run.generator_methods", f"generator {generator!r} ({key}) does not sample "
                                  f"{law.get('method', 'rd')!r}, the LAW tables' method")
        if law.get("segmenter") and law["segmenter"] not in run["segmenters"]:
            raise ConfigError("analyses.law.segmenter", f"{law['segmenter']!r} is not in run.segmenters")
        figure = law.get("figure")
        if figure and config["generators"][figure]["training"].get("weighting", "uniform") != "law":
            raise ConfigError("analyses.law.figure", f"generator {figure!r} is not trained with weighting: law")
    victr = analyses.get("victr")
    if victr:
        for table in ("synthesis", "ablation"):
            for label, row in (victr.get(table) or {}).items():
                if row["generator"] not in run["generators"]:
                    raise ConfigError(f"analyses.victr.{table}", f"row {label!r}: generator {row['generator']!r} "
                                      f"is not in run.generators {run['generators']}")
                if row["method"] not in run["methods"]:
                    raise ConfigError(f"analyses.victr.{table}", f"row {label!r}: method {row['method']!r} is not "
                                      f"in run.methods {run['methods']}")
                if not synthesizes(config, row["generator"], row["method"]):
                    raise ConfigError("run.generator_methods", f"analyses.victr.{table} row {label!r}: generator "
                                      f"{row['generator']!r} does not sample {row['method']!r}")
        if victr.get("segmenter") and victr["segmenter"] not in run["segmenters"]:
            raise ConfigError("analyses.victr.segmenter", f"{victr['segmenter']!r} is not in run.segmenters")
    for segmenter in ((analyses.get("order") or {}).get("segmenters") or {}).values():
        if segmenter not in run["segmenters"]:
            raise ConfigError("analyses.order.segmenters", f"{segmenter!r} is not in run.segmenters")
    leaf = analyses.get("leaf") or {}
    for table in ("parameterisation", "lambda", "stability"):
        for label, segmenter in (leaf.get(table) or {}).items():
            if segmenter not in run["segmenters"]:
                raise ConfigError(f"analyses.leaf.{table}", f"row {label!r}: {segmenter!r} is not in run.segmenters")
            if table == "stability" and config["segmenters"][segmenter]["kind"] != "leaf":
                raise ConfigError("analyses.leaf.stability", f"row {label!r}: {segmenter!r} is a "
                                  f"{config['segmenters'][segmenter]['kind']}, not a leaf segmenter: only a "
                                  "diffusion segmenter depends on an inference seed")
    cross = analyses.get("cross_domain")
    if cross:
        if cross["train"] not in run["datasets"]:
            raise ConfigError("analyses.cross_domain.train", f"{cross['train']!r} is not in run.datasets {run['datasets']}")
        if cross["test"] not in config["datasets"] or cross["test"] == cross["train"]:
            raise ConfigError("analyses.cross_domain.test", f"{cross['test']!r} is not another dataset defined under "
                              f"'datasets' (defined: {sorted(config['datasets'])})")
        train, test = config["datasets"][cross["train"]], config["datasets"][cross["test"]]
        for key, default in (("channels", 1), ("class_names", None), ("resolution", None)):
            if train.get(key, default) != test.get(key, default):
                raise ConfigError("analyses.cross_domain.test", f"{cross['test']!r} has {key} "
                                  f"{test.get(key, default)!r}, {cross['train']!r} {train.get(key, default)!r}: "
                                  "a model is tested on a dataset of its own kind")
    for name in run["generators"]:
        entry = config["generators"][name]
        if "victr" not in entry:
            continue
        source = entry["victr"].get("source")
        if source is not None and source not in config["datasets"]:
            raise ConfigError(f"generators.{name}.victr.source", f"{source!r} is not defined under 'datasets'")
        if entry["training"].get("weighting", "uniform") != "uniform":
            raise ConfigError(f"generators.{name}.training.weighting", "a ViCTr generator trains with its own "
                              "losses (generators.*.victr.losses); LAW's weightings are for the diffusion generators")
    for dataset in run["datasets"]:
        miner_schedule(config, dataset)


def own_budget(config: dict, method: str) -> float:
    """The budget of a method's main run: its entry's ``budget``, else ``synthesis.budget``."""
    return float(config["methods"][method].get("budget", config["synthesis"]["budget"]))


def budget_methods(config: dict) -> dict[str, dict]:
    """The method entries the budget sweep adds: ``<method>_x<b>`` = the method with budget b, for every b but
    the method's own budget (``own_budget``: that point of the sweep is the method's main run). A derived name
    that is already a configured method is a ConfigError."""
    sweep = (config.get("analyses") or {}).get("budget")
    derived = {}
    for method in (sweep or {}).get("methods", []):
        for budget in sweep["budgets"]:
            if float(budget) == own_budget(config, method):
                continue
            name = budget_name(method, budget)
            if name in config["methods"]:
                raise ConfigError(f"methods.{name}", "this name is reserved for the budget sweep of "
                                  f"{method!r} at {budget:g}× (analyses.budget); rename the method")
            derived[name] = {**config["methods"][method], "budget": float(budget)}
    return derived


def budget_seeds(config: dict) -> list[int]:
    """The synthesis seeds of the budget sweep (``analyses.budget.n_seed``, default ``seeds.n_seed``)."""
    sweep = (config.get("analyses") or {}).get("budget")
    if not sweep:
        return []
    return list(range(sweep.get("n_seed", config["seeds"]["n_seed"])))


def budget_sources(config: dict) -> dict[str, str]:
    """The synthetic sets of the budget sweep that are cut from a larger one instead of synthesised:
    {method: source method}, for the sweep's seeds (``budget_seeds``).

    A swept method's sets at every budget differ only in their length: ``conditioning_sources`` draws whole
    seeded permutations of the training masks and cuts them to round(budget × |train|), and the noise of sample
    i is ``noise_seed(seed, i)`` whatever the budget, so the first round(b × |train|) samples of the largest
    budget's set are the budget-b set. Per swept method, the member of its family (the method itself, whose
    budget is its configured one, and its ``<method>_x<b>`` entries) with the largest budget is synthesised and
    every smaller member is its prefix (``segsynth.analyses.budget_prefix``)."""
    sweep = (config.get("analyses") or {}).get("budget")
    sources: dict[str, str] = {}
    for method in (sweep or {}).get("methods", []):
        family = {method: config["methods"][method]}
        for budget in sweep["budgets"]:
            if float(budget) != own_budget(config, method):
                name = budget_name(method, budget)
                family[name] = config["methods"].get(name) or {**config["methods"][method], "budget": float(budget)}

        def size(name):
            return float(family[name].get("budget", config["synthesis"]["budget"]))

        largest = max(family, key=size)  # the first of equal budgets: the method itself
        sources.update({name: largest for name in family if size(name) < size(largest)})
    return sources


def round_methods(config: dict) -> dict[str, dict]:
    """The method entries of the synthesize–train rounds (VGD paper, Fig. 5; ``analyses.rounds``): round r ≥ 2 of
    ``method`` is ``<method>_round<r>``, the same sampler, whose f_θ is the segmenter trained on real + round r − 1's
    set (``round_previous``). A derived name that is already a configured method is a ConfigError."""
    rounds = (config.get("analyses") or {}).get("rounds")
    if not rounds:
        return {}
    method = rounds["method"]
    if method not in config["methods"]:
        raise ConfigError("analyses.rounds.method", f"{method!r} is not defined under 'methods'")
    if config["methods"][method]["sampler"] == "miner":
        raise ConfigError("analyses.rounds.method", "the Miner is trained against the real-only f_θ; a round's f_θ "
                          "is a real + synthetic model, so rounds take a sampler that reads f_θ at sampling time")
    derived = {}
    for r in range(2, rounds["rounds"] + 1):
        name = round_name(method, r)
        if name in config["methods"]:
            raise ConfigError(f"methods.{name}", f"this name is reserved for round {r} of {method!r} "
                              "(analyses.rounds); rename the method")
        derived[name] = dict(config["methods"][method])
    return derived


def round_previous(config: dict) -> dict[str, str]:
    """{round r ≥ 2's method: round r − 1's method}: the set whose real + synthetic model is round r's f_θ."""
    rounds = (config.get("analyses") or {}).get("rounds")
    if not rounds:
        return {}
    names = [rounds["method"]] + [round_name(rounds["method"], r) for r in range(2, rounds["rounds"] + 1)]
    return dict(zip(names[1:], names[:-1]))


def round_name(method: str, r: int) -> str:
    return method if r == 1 else f"{method}_round{r}"


def budget_name(method: str, budget: float) -> str:
    """The derived method of a budget-sweep entry: ``rd`` at 2 → ``rd_x2``; 1.5 → ``rd_x1p5``."""
    return f"{method}_x{_number(budget)}"


def subset_name(method: str, threshold: float) -> str:
    """The derived method of an adversariality subset: ``rd`` above 0.3 → ``rd_ls0p3``."""
    return f"{method}_ls{_number(threshold)}"


def _number(value: float) -> str:
    return f"{float(value):g}".replace(".", "p")


def canonical(value):
    """``value`` with every mapping's keys sorted, recursively.

    Rules pass config slices as ``params``, and Snakemake reruns a job when its params' representation changes;
    sorting makes that representation independent of the order keys happen to have in a config file."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    return value


def synthesis_defaults(config: dict, dataset: str) -> dict:
    """The synthesis settings of ``dataset``: config ``synthesis`` with the dataset's own guidance scales."""
    params = dict(config["synthesis"])
    for key in ("guidance_scale", "mask_guidance_scale"):
        if key in config["datasets"][dataset]:
            params[key] = config["datasets"][dataset][key]
    return params


#: the shared sections a dataset may override for its own jobs (``datasets.<name>.overrides``)
OVERRIDABLE = ("generators", "methods", "miner")


def for_dataset(config: dict, dataset: str) -> dict:
    """The config as ``dataset``'s jobs see it: ``datasets.<dataset>.overrides`` merged over the shared
    ``generators``, ``methods`` and ``miner`` sections. One run can then hold datasets that need their own
    recipe under the same names (the grey MNI152 default fine-tunes the shipped checkpoint, an RGB polyp
    dataset trains the same generator from scratch), so every table lines the datasets up row by row."""
    overrides = config["datasets"][dataset].get("overrides") or {}
    if not overrides:
        return config
    merged = dict(config)
    for section, update in overrides.items():
        merged[section] = copy.deepcopy(config[section])
        _merge(merged[section], update)
    return merged


def method_params(config: dict, dataset: str, method: str) -> dict:
    """The settings of one synthesis job: synthesis defaults < the dataset's guidance scales < the method entry
    (the dataset's override of it included)."""
    params = synthesis_defaults(config, dataset)
    params.update(for_dataset(config, dataset)["methods"][method])
    return canonical(params)


#: the settings of a method that decide its DDIM trajectory (its x_T, steps and denoiser), which the Miner is
#: trained on: a Miner trained on one schedule's prefix is not the Miner of another schedule
SCHEDULE_KEYS = ("steps", "eta", "guidance_scale", "mask_guidance_scale")


def synthesizes(config: dict, generator: str, method: str) -> bool:
    """Whether the run samples ``method`` with ``generator``: every run.methods × run.generators pair, unless
    ``run.generator_methods`` lists the generator's own methods (a run that holds several papers' generators
    samples each with the methods its tables use, not the product)."""
    only = (config["run"].get("generator_methods") or {}).get(generator)
    return only is None or method in only


def trains_on(config: dict, segmenter: str, method: str) -> bool:
    """Whether ``segmenter`` trains on real + each ``method`` set: all of them, unless ``run.segmenter_methods``
    lists the segmenter's own ([] for a real-only model, e.g. the segmenter papers' rows)."""
    only = (config["run"].get("segmenter_methods") or {}).get(segmenter)
    return only is None or method in only


def used_methods(config: dict) -> list[str]:
    """The methods a run synthesises: ``run.methods`` and those its analyses name, in that order, once each."""
    analyses = config.get("analyses") or {}
    names = list(config["run"]["methods"])
    names += (analyses.get("budget") or {}).get("methods", [])
    names += [analyses["subsets"]["method"]] if analyses.get("subsets") else []
    names += (analyses.get("synthetic_only") or {}).get("methods", [])
    return list(dict.fromkeys(names))


def miner_schedule(config: dict, dataset: str) -> dict:
    """The sampling schedule (``SCHEDULE_KEYS``) the Miner of ``dataset`` is trained for: that of the run's
    methods whose sampler is "miner", which must agree, since one trained M_ξ serves them all (the Miner paper's
    code trains on the first steps of the deployed schedule, at its guidance scale). Synthesis defaults when
    no method uses the Miner."""
    schedules = {}
    for method in used_methods(config):
        if config["methods"].get(method, {}).get("sampler") == "miner":
            params = method_params(config, dataset, method)
            schedules[method] = {key: params.get(key, 1.0) for key in SCHEDULE_KEYS}
    if len({tuple(s.values()) for s in schedules.values()}) > 1:
        raise ConfigError("methods", "the Miner is trained on the sampling schedule it is deployed with, so the "
                          f"miner methods must share {', '.join(SCHEDULE_KEYS)}; on {dataset!r} they differ: "
                          f"{schedules}")
    if schedules:
        return next(iter(schedules.values()))
    params = synthesis_defaults(config, dataset)
    return {key: params.get(key, 1.0) for key in SCHEDULE_KEYS}


def denoiser_passes(params: dict) -> int:
    """Denoiser evaluations per sampling step: the conditional one, plus one per classifier-free guidance
    that is on (prompt, mask; segsynth.generator.model.MaskToImageGenerator.guided_noise)."""
    return 1 + (params["guidance_scale"] != 1.0) + (params.get("mask_guidance_scale", 1.0) != 1.0)


#: the settings that decide an RD sample besides its seed, mask and generator (GAUDA's candidate 0 shares them)
_DDIM_KEYS = ("steps", "eta", "guidance_scale", "mask_guidance_scale", "budget", "mask_source", "mask_augment")


def candidate_source(config: dict, dataset: str, method: str) -> str | None:
    """The RD method whose samples are GAUDA ``method``'s first candidates by construction, if the run makes one.

    GAUDA's candidate 0 is the DDIM sample of each sample's own seed (segsynth.sampling.baselines.candidate_seed):
    with the same steps, η, guidance scale and budget (so the same masks in the same order), the run's RD set of
    the same generator and seed holds exactly those images, and the GAUDA job reads them instead of sampling
    them again. None for other samplers, or when no RD method of ``run.methods`` matches."""
    if config["methods"][method]["sampler"] != "gauda":
        return None
    mine = method_params(config, dataset, method)
    # GAUDA's defaults (segsynth.sampling.baselines.GAUDASampler): class-adaptive masks are not RD's masks,
    # and one candidate per mask needs none read
    if mine.get("class_adaptive", True) or mine.get("oversample", 1) <= 1:
        return None
    for other in config["run"]["methods"]:
        if config["methods"].get(other, {}).get("sampler") == "ddim":
            theirs = method_params(config, dataset, other)
            if all(theirs.get(key) == mine.get(key) for key in _DDIM_KEYS):
                return other
    return None


def validate_config(config: dict) -> None:
    """Schema + references, for use outside Snakemake (tests, library callers)."""
    import jsonschema

    schema = yaml.safe_load(SCHEMA.read_text())
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as err:
        key = ".".join(str(p) for p in err.absolute_path) or "<root>"
        raise ConfigError(key, err.message) from None
    check_references(config)


# Settings that change how a job runs, never what it computes. They are left out of the rule params that
# Snakemake compares between runs, so changing one reruns nothing; the jobs read them from the config.
# (Synthesis noise is drawn per sample from its own seed, so the batch size changes no sample; trainers
# resume bit-identically from any checkpoint interval; nnU-Net's data_workers only parallelise loading.)
#: the ``mask_vae`` entry's defaults (segsynth.mask_vae; config.yaml has the embedded default's values)
MASK_VAE_DEFAULTS = {"latent_size": 32, "channels": [16, 32, 64], "steps": 400, "batch_size": 32, "lr": 1.0e-3,
                     "kl_weight": 1.0, "checkpoint_every": 100}

RUNTIME_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "generator": (("training", "checkpoint_every"), ("training", "gradient_checkpointing")),
    "miner": (("checkpoint_every",),),
    "mask_vae": (("checkpoint_every",),),
    "segmenter": (("checkpoint_every",), ("data_workers",), ("compile",)),
    "synthesis": (("batch_size",),),
}


def science(kind: str, entry: dict) -> dict:
    """``entry`` (a config entry of ``kind``, see ``RUNTIME_KEYS``) without its runtime settings, key-sorted:
    the part of a job's settings that decides its result, and so the part that reruns it when edited."""
    entry = canonical(entry)
    for path in RUNTIME_KEYS[kind]:
        *parents, key = path
        node = entry
        for parent in parents:
            node = node.get(parent) or {}
        node.pop(key, None)
    return entry


def input_files(paths) -> list[str]:
    """Every file under the given files or folders (recursively, sorted), for a rule's ``input:``.

    Raw dataset files and pretrained weights are read by path from the config; listing them as inputs makes
    Snakemake rerun the job when one is replaced in place. A path that does not exist lists nothing: the
    job's own reader then fails with an error naming it."""
    files = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_file():
            files.append(str(path))
        elif path.is_dir():
            files.extend(str(f) for f in sorted(path.rglob("*")) if f.is_file() and not f.name.startswith("."))
    return files


def dataset_sources(entry: dict) -> list[str]:
    """The files a dataset entry's adapter reads (see ``input_files``)."""
    if entry["kind"] == "mni152":
        # the MNI152 template files inside the installed nilearn (located without importing it)
        import importlib.util

        spec = importlib.util.find_spec("nilearn")
        if spec is None or not spec.submodule_search_locations:
            return []
        data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
        return [str(f) for f in sorted(data.glob("mni_icbm152_*"))]
    if entry["kind"] == "folder":
        return input_files([entry["images"], entry["masks"], *(entry.get("split_files") or {}).values()])
    return input_files([entry["root"]])


#: Generator checkpoints shipped inside the package (as nilearn ships its template), by name.
SHIPPED_GENERATORS = Path(__file__).resolve().parent / "pretrained"


def generator_init_path(value: str) -> Path:
    """A generator entry's ``init``: the name of a checkpoint shipped in ``segsynth/pretrained/`` or a path."""
    shipped = SHIPPED_GENERATORS / value
    return shipped if "/" not in value and shipped.is_dir() else Path(value).expanduser()


#: ViCTr's Stage-2 loss terms and their default weights (the paper gives no values; 0 switches a term off)
VICTR_STAGE2_LOSSES = {"diffusion": 1.0, "spatial": 0.1, "temporal": 0.1, "l2": 0.1, "ssim": 0.1, "ewc": 1.0}
VICTR_STAGE1_LOSSES = {"diffusion": 1.0, "l2": 0.1, "ssim": 0.1}
#: the layers ViCTr's LoRA adapts by default: attention projections and the ResNet convolutions
VICTR_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
#: the `training` keys of a ViCTr entry that only Stage 2 reads (Stage 1's own default to them, see victr_options)
VICTR_STAGE2_TRAINING_KEYS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "ema_decay")


def victr_options(cfg: dict) -> dict:
    """A victr generator's settings (segsynth.victr), defaults filled in: Stage 2 is the entry's ``training``
    (steps, batch size, lr, warm-up, clipping, prompt dropout, hflip, checkpointing: what every generator's
    training has), ViCTr's own keys come from ``victr`` (Stage 1's steps/batch/lr default to Stage 2's)."""
    train, own = cfg["training"], cfg["victr"]
    stage1 = {"batch_size": train.get("batch_size"), "lr": train.get("lr"), "warmup_steps": 0,
              "grad_clip": train.get("grad_clip", 1.0), **(own.get("stage1") or {})}
    stage1["losses"] = {**VICTR_STAGE1_LOSSES, **(stage1.get("losses") or {})}
    return {"tweedie": own.get("tweedie", True), "temporal_gap": own.get("temporal_gap", 0.1),
            "fisher_batches": own.get("fisher_batches", 8), "prompt_dropout": train.get("prompt_dropout", 0.0),
            "mask_dropout": train.get("mask_dropout", 0.0),
            "hflip": train.get("hflip", True), "checkpoint_every": train.get("checkpoint_every", 50),
            "train_unet": train.get("train_unet", True), "stage1": stage1, "stage2": dict(train),
            "losses": {**VICTR_STAGE2_LOSSES, **(own.get("losses") or {})},
            "lora": {"rank": 16, "alpha": None, "target_modules": list(VICTR_LORA_TARGETS), **(own.get("lora") or {})}}


def victr_stage1_settings(entry: dict) -> dict | None:
    """What decides a ViCTr generator's Stage 1 (its weights and Fisher), or None when it has none (no
    ``victr.source`` or 0 steps): the entry without its runtime keys and without what only Stage 2 reads (the
    training loop's sizes, the Stage-2 losses, the LoRA rank and α), every option Stage 1 reads resolved to its
    value. Generators that agree on it share one Stage-1 job (``train_victr_stage1``): the ablation's rows differ
    only in Stage 2. A key not known to be Stage 2's stays in, so an unknown setting splits jobs, never merges
    them. It is itself a generator entry whose settings are itself."""
    own = entry.get("victr")
    if not own or not own.get("source"):
        return None
    opts = victr_options(entry)
    if not opts["stage1"].get("steps"):
        return None
    settings = science("generator", entry)
    training = {k: v for k, v in settings["training"].items() if k not in VICTR_STAGE2_TRAINING_KEYS}
    training.update({k: opts[k] for k in ("prompt_dropout", "mask_dropout", "hflip", "train_unet")})
    victr = {k: v for k, v in settings["victr"].items() if k not in ("losses", "lora")}
    victr.update({k: opts[k] for k in ("tweedie", "temporal_gap", "fisher_batches", "stage1")},
                 lora={"target_modules": opts["lora"]["target_modules"]})
    return canonical({**settings, "training": training, "victr": victr})


def victr_stage1(config: dict, dataset: str, generator: str) -> list[str]:
    """A ViCTr generator's Stage-1 file (the train_generator job's extra input; ``train_victr_stage1``'s
    output), or nothing: ``results/{dataset}/victr_stage1/{key}.pt``, its key a hash of everything that decides
    it, so the generators of a run that share their Stage 1 share the file."""
    import hashlib
    import json

    settings = victr_stage1_settings(for_dataset(config, dataset)["generators"][generator])
    if settings is None:
        return []
    text = json.dumps({"settings": settings, "seed": config["seeds"]["generator"],
                       "prompt_template": config["datasets"][dataset].get("prompt_template", "{classes}")},
                      sort_keys=True)
    return [f"results/{dataset}/victr_stage1/{hashlib.sha256(text.encode()).hexdigest()[:12]}.pt"]


def victr_stage1_generator(config: dict, dataset: str, key: str) -> str:
    """The first generator (in config order) whose Stage-1 file is ``key``'s: the entry its job reads."""
    for generator in config["generators"]:
        if victr_stage1(config, dataset, generator) == [f"results/{dataset}/victr_stage1/{key}.pt"]:
            return generator
    raise ConfigError("generators", f"no ViCTr generator of dataset {dataset!r} has the Stage 1 {key!r}")


def weight_sources(entry: dict) -> list[str]:
    """The pretrained weight files a generator or segmenter entry loads (see ``input_files``)."""
    paths = [p for p in (entry.get("pretrained"), entry.get("pretrained_swin")) if p]
    dag_outputs = []
    if entry.get("init"):
        init = generator_init_path(entry["init"])
        if not init.is_absolute() and init.parts[:1] == ("results",):
            dag_outputs.append(str(init))  # another generator of the run: the DAG trains it first
        else:
            paths.append(init)
    return dag_outputs + input_files(paths)
