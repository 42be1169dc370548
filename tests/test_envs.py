"""The per-rule conda envs: generated from constraints.txt, consistent with every rule's imports, and (tier
``envs``, ``make test-envs``) installable into a fresh venv where everything their rules import imports.

No conda channel is reachable here, so the install tier proves what pip can: each env's pip set, exactly as
pinned, installs without dependencies (``--no-deps``) into a fresh venv, ``pip check`` finds nothing missing,
and every segsynth module the env's rules run imports from there, with the workflow folder on ``sys.path`` as
the Snakefile puts it.
"""

import re
import subprocess
import venv

import pytest
import yaml

from conftest import REPO

from segsynth.envs import (ENVS_DIR, PER_BUILD, constraints, env_files, module_distributions, pip_requirements,
                           rule_envs)
from segsynth.provenance import import_closure, third_party_imports

ENV_OF_FAMILY = {"data": "data.yaml", "tables": "tables.yaml", "torch": "torch-cuda.yaml"}


def pinned_names(env_file: str) -> dict[str, str]:
    text = (ENVS_DIR / env_file).read_text()
    pins = {}
    for line in pip_requirements(text):
        if not line.startswith("-"):
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def test_env_files_are_what_the_generator_writes_from_the_constraints():
    generated = env_files()
    assert set(generated) == {p.name for p in ENVS_DIR.glob("*.yaml")}
    for name, text in generated.items():
        assert (ENVS_DIR / name).read_text() == text, f"envs/{name} is stale: run `make envs`"


def test_every_pin_agrees_with_constraints_and_nothing_is_relative():
    pins = constraints()
    for path in ENVS_DIR.glob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"-e\s|\.\./|\s\.\.?\s*$", text, flags=re.M), path  # nothing relative to the file
        spec = yaml.safe_load(text)
        assert spec["channels"] == ["conda-forge", "nodefaults"]
        for name, version in pinned_names(path.name).items():
            assert version.removesuffix("+cpu") == pins[name], (path.name, name, version)


def test_torch_lives_only_where_a_rule_needs_it():
    assert "torch" not in pinned_names("tables.yaml")
    assert pinned_names("data.yaml")["torch"].endswith("+cpu")  # MONAI transforms only: never a CUDA download
    assert pinned_names("torch-cuda.yaml")["torch"] == constraints()["torch"]
    assert pinned_names("torch-cpu.yaml")["torch"] == constraints()["torch"] + "+cpu"
    # the two builds differ in torch, torchvision and the index, nothing else
    cpu, cuda = pinned_names("torch-cpu.yaml"), pinned_names("torch-cuda.yaml")
    assert {n for n in cpu if cpu[n] != cuda.get(n)} == PER_BUILD and cpu.keys() == cuda.keys()


def test_every_rule_script_imports_only_what_its_env_declares():
    rules = rule_envs()
    assert {"splits", "train_generator", "synthesize", "main_table", "evaluate_augmented"} <= set(rules)
    for rule, (family, script) in rules.items():
        declared = set(pinned_names(ENV_OF_FAMILY[family]))
        needed = module_distributions(third_party_imports(script))
        assert needed <= declared, f"rule {rule} ({script.name}) imports {sorted(needed - declared)}, " \
                                   f"missing from envs/{ENV_OF_FAMILY[family]}"


def test_the_import_walk_sees_function_level_imports(tmp_path):
    package = tmp_path / "segsynth"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lazy.py").write_text("import numpy\n\ndef f():\n    import scipy.ndimage\n    from . import eager\n")
    (package / "eager.py").write_text("from pandas import DataFrame\n")
    script = tmp_path / "script.py"
    script.write_text("from segsynth.lazy import f\n")
    assert third_party_imports(script, root=tmp_path) == {"numpy", "scipy", "pandas"}
    assert {p.name for p in import_closure(script, root=tmp_path)} == {"script.py", "__init__.py", "lazy.py",
                                                                      "eager.py"}


def _segsynth_modules(family: str) -> list[str]:
    modules = set()
    for env, script in rule_envs().values():
        if env == family:
            for path in import_closure(script):
                if path.is_relative_to(REPO / "segsynth"):
                    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
                    modules.add(module.removesuffix(".__init__"))
    return sorted(modules)


@pytest.mark.envs
@pytest.mark.parametrize("env_file, family", [("tables.yaml", "tables"), ("data.yaml", "data"),
                                              ("torch-cpu.yaml", "torch")])
def test_the_env_installs_into_a_fresh_venv_and_its_rules_import(tmp_path, env_file, family):
    lines = pip_requirements((ENVS_DIR / env_file).read_text())
    # No CPU torchvision is installable here (the brief's machine has only a CPU torch wheel); timm, which
    # requires it, is left unimported, as in the project's venv.
    packages = [line for line in lines if not line.startswith("-") and not line.startswith("torchvision==")]
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", *packages],
                             capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    # Known and harmless: the missing torchvision (above) and unittest2's argparse, a stdlib backport.
    problems = [line for line in check.stdout.splitlines()
                if "requires" in line and not re.search(r"requires (torchvision|argparse),", line)]
    assert not problems, check.stdout
    modules = _segsynth_modules(family)
    code = "import sys; sys.path.insert(0, sys.argv[1])\n" + "".join(f"import {m}\n" for m in modules)
    imported = subprocess.run([python, "-c", code, str(REPO)], capture_output=True, text=True, cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=600)
    assert imported.returncode == 0, imported.stderr[-3000:]
    if family == "tables":  # the table and figure rules run without PyTorch
        probe = subprocess.run([python, "-c", "import torch"], capture_output=True)
        assert probe.returncode != 0
