"""Config checks that a JSON schema cannot express, and the merging of settings for one job.

The schema (``schemas/config.schema.yaml``, applied by ``snakemake.utils.validate`` at start) checks keys,
types and ranges; ``check_references`` checks that every name the ``run`` section uses is defined.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import ConfigError

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


def check_references(config: dict) -> None:
    """Every dataset, generator, segmenter and method that ``run`` names must be defined."""
    run = config["run"]
    for section in ("datasets", "generators", "segmenters", "methods"):
        for name in run[section]:
            if name not in config[section]:
                raise ConfigError(f"run.{section}", f"{name!r} is not defined under '{section}' "
                                  f"(defined: {sorted(config[section])})")
    if run["value_segmenter"] not in config["segmenters"]:
        raise ConfigError("run.value_segmenter", f"{run['value_segmenter']!r} is not defined under 'segmenters'")
    analyses = config.get("analyses") or {}
    named = [("analyses.budget.methods", m) for m in (analyses.get("budget") or {}).get("methods", [])]
    if analyses.get("subsets"):
        named.append(("analyses.subsets.method", analyses["subsets"]["method"]))
    for key, name in named:
        if name not in config["methods"]:
            raise ConfigError(key, f"{name!r} is not defined under 'methods' (defined: {sorted(config['methods'])})")


def budget_methods(config: dict) -> dict[str, dict]:
    """The method entries the budget sweep adds: ``<method>_x<b>`` = the method with budget b (b ≠ 1; b = 1 is
    the method itself). A derived name that is already a configured method is a ConfigError."""
    from .analyses import budget_name

    sweep = (config.get("analyses") or {}).get("budget")
    derived = {}
    for method in (sweep or {}).get("methods", []):
        for budget in sweep["budgets"]:
            if float(budget) == 1.0:
                continue
            name = budget_name(method, budget)
            if name in config["methods"]:
                raise ConfigError(f"methods.{name}", "this name is reserved for the budget sweep of "
                                  f"{method!r} at {budget:g}× (analyses.budget); rename the method")
            derived[name] = {**config["methods"][method], "budget": float(budget)}
    return derived


def canonical(value):
    """``value`` with every mapping's keys sorted, recursively.

    Rules pass config slices as ``params``, and Snakemake reruns a job when its params' representation changes;
    sorting makes that representation independent of the order keys happen to have in a config file."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    return value


def method_params(config: dict, dataset: str, method: str) -> dict:
    """The settings of one synthesis job: synthesis defaults < the dataset's guidance scale < the method entry."""
    params = dict(config["synthesis"])
    if "guidance_scale" in config["datasets"][dataset]:
        params["guidance_scale"] = config["datasets"][dataset]["guidance_scale"]
    params.update(config["methods"][method])
    return canonical(params)


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
