"""Reruns follow the science: runtime settings rerun nothing, library code reruns the rules that run it, raw
dataset files and pretrained weights are inputs.

The workflow-level tests run on a copy of the workflow (so they can edit its library code) and keep to the
cheap jobs: dataset splits and a 10-step tiny generator.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO

from segsynth.config import RUNTIME_KEYS, science, weight_sources
from segsynth.provenance import code_version

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
WORKFLOW = ["Snakefile", "config.yaml", "rules", "scripts", "schemas", "report", "profiles", "envs", "segsynth"]


def test_science_drops_exactly_the_runtime_settings():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    generator = science("generator", config["generators"]["tiny"])
    assert "checkpoint_every" not in generator["training"] and generator["training"]["lr"] == 5e-4
    assert "checkpoint_every" in config["generators"]["tiny"]["training"]  # the config itself is untouched
    nnunet = science("segmenter", config["segmenters"]["nnunet"])
    assert not {"checkpoint_every", "data_workers"} & set(nnunet) and nnunet["epochs"] == 20
    assert science("synthesis", {"batch_size": 8, "steps": 25, "eta": 0.2}) == {"eta": 0.2, "steps": 25}
    # a training batch size decides the result: it stays
    assert science("segmenter", config["segmenters"]["unet"])["batch_size"] == 16
    assert set(RUNTIME_KEYS) == {"generator", "miner", "mask_vae", "segmenter", "synthesis"}
    assert science("mask_vae", config["mask_vae"]) == {k: v for k, v in config["mask_vae"].items()
                                                      if k != "checkpoint_every"}


def copy_workflow(destination: Path) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, destination / name)
    return destination


def test_code_version_follows_the_modules_a_script_imports(tmp_path):
    root = copy_workflow(tmp_path)
    script = root / "scripts" / "splits.py"
    before = code_version(script, root=root)
    assert before == code_version(script, root=root) and len(before) == 16

    # comments and docstrings are not code
    folder = root / "segsynth" / "data" / "folder.py"
    text = folder.read_text()
    folder.write_text(text.replace('"""', '"""Edited docstring. ', 1) + "\n# a comment\n")
    assert code_version(script, root=root) == before
    # a module the script does not reach
    (root / "segsynth" / "miner.py").write_text((root / "segsynth" / "miner.py").read_text() + "\nX = 1\n")
    assert code_version(script, root=root) == before
    # a module it reaches through the adapters
    folder.write_text(text + "\nX = 1\n")
    assert code_version(script, root=root) != before
    # and through a function-level import: segsynth.data.mni152 imports nilearn lazily, the evaluation
    # imports nnU-Net's module through the segmenter registry
    evaluate = root / "scripts" / "evaluate.py"
    reference = code_version(evaluate, root=root)
    nnunet = root / "segsynth" / "segmenters" / "nnunet.py"
    nnunet.write_text(nnunet.read_text() + "\nY = 2\n")
    assert code_version(evaluate, root=root) != reference


def test_the_provenance_cache_keeps_only_current_files(tmp_path, monkeypatch):
    import json

    from segsynth import provenance

    monkeypatch.setattr(provenance, "CACHE", tmp_path / "cache" / "provenance.json")
    monkeypatch.setattr(provenance, "_cache", None)
    module = tmp_path / "pkg" / "module.py"
    module.parent.mkdir()
    module.write_text("X = 1\n")
    gone = tmp_path / "pkg" / "gone.py"
    gone.write_text("Y = 2\n")
    for path in (module, gone):
        provenance._cached_analysis(path, tmp_path)
    module.write_text("X = 12345\n")  # an edit: new size, new key
    provenance._cached_analysis(module, tmp_path)
    gone.unlink()
    provenance._save_cache()
    keys = list(json.loads(provenance.CACHE.read_text()))
    assert len(keys) == 1 and keys[0].startswith(f"{module}|")


def test_pretrained_weights_are_inputs(tmp_path):
    weights = tmp_path / "sd"
    (weights / "unet").mkdir(parents=True)
    (weights / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (weights / "model_index.json").write_text("{}")
    swin = tmp_path / "swin.pth"
    swin.write_bytes(b"y")
    assert weight_sources({"pretrained": str(weights)}) == [str(weights / "model_index.json"),
                                                            str(weights / "unet" / "diffusion_pytorch_model.safetensors")]
    assert weight_sources({"pretrained_swin": str(swin)}) == [str(swin)]
    assert weight_sources({"pretrained": None}) == []


def write_folder_dataset(directory: Path, n: int = 12, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    (directory / "images").mkdir(parents=True)
    (directory / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(4, size - 12, 2)
        mask[y:y + 8, x:x + 8] = 255
        image = np.clip(rng.normal(60, 10, (size, size)) + (mask > 0) * 120, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(directory / "images" / f"case{i:02d}.png")
        Image.fromarray(mask).save(directory / "masks" / f"case{i:02d}.png")


def snakemake(workdir: Path, *args, timeout=300):
    result = subprocess.run(["timeout", "-k", "15", str(timeout), SNAKEMAKE, "--cores", "1", *args], cwd=workdir,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def planned(output: str) -> set[str]:
    """The rules a dry run would run."""
    if "Nothing to be done" in output:
        return set()
    return set(re.findall(r"^rule (\w+):", output, flags=re.M)) - {"all"}


@pytest.fixture
def workflow(tmp_path):
    """A copy of the workflow with a folder dataset 'toy' (raw PNGs) and the e2e config's tiny models."""
    root = copy_workflow(tmp_path / "workflow")
    write_folder_dataset(tmp_path / "raw")
    config = yaml.safe_load((REPO / "tests" / "config" / "e2e.yaml").read_text())
    config["datasets"]["toy"] = {"kind": "folder", "images": str(tmp_path / "raw" / "images"),
                                 "masks": str(tmp_path / "raw" / "masks"), "resolution": 32, "channels": 1,
                                 "class_names": ["background", "lesion"], "mask_threshold": 127}
    config["run"]["datasets"] = ["toy"]
    (root / "tests.yaml").write_text(yaml.safe_dump(config))
    return root


def test_library_code_and_raw_files_rerun_what_they_feed(workflow, tmp_path):
    target = ["--configfile", "tests.yaml", "--", "results/toy/data"]
    snakemake(workflow, *target)
    assert planned(snakemake(workflow, "-n", *target)) == set()

    # library code the split does not run: nothing; code it runs: the split
    miner = workflow / "segsynth" / "miner.py"
    miner.write_text(miner.read_text() + "\nX = 1\n")
    assert planned(snakemake(workflow, "-n", *target)) == set()
    canonical = workflow / "segsynth" / "data" / "canonical.py"
    original = canonical.read_text()
    canonical.write_text(original + "\nX = 1\n")
    dry = snakemake(workflow, "-n", *target)
    assert planned(dry) == {"splits"} and "Params have changed" in dry
    canonical.write_text(original)
    assert planned(snakemake(workflow, "-n", *target)) == set()

    # a raw image replaced in place
    image = tmp_path / "raw" / "images" / "case03.png"
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(image)
    dry = snakemake(workflow, "-n", *target)
    assert planned(dry) == {"splits"} and "Updated input files" in dry


def test_runtime_settings_rerun_nothing_and_result_settings_rerun(workflow):
    target = ["--configfile", "tests.yaml", "--", "results/toy/generators/tiny"]
    snakemake(workflow, *target)
    assert planned(snakemake(workflow, "-n", *target)) == set()

    config = yaml.safe_load((workflow / "tests.yaml").read_text())
    config["generators"]["tiny"]["training"]["checkpoint_every"] = 3
    config["synthesis"]["batch_size"] = 7
    config["segmenters"]["unet"]["checkpoint_every"] = 3
    (workflow / "tests.yaml").write_text(yaml.safe_dump(config))
    assert planned(snakemake(workflow, "-n", *target)) == set()

    config["generators"]["tiny"]["training"]["lr"] = 2e-3
    (workflow / "tests.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(workflow, "-n", *target)
    assert planned(dry) == {"train_generator"} and "Params have changed" in dry
