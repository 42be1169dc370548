"""Faults on a local run: `kill -9` of the whole workflow at random points, several times, then a rerun.

The rerun must finish, nothing it finds on disk may be corrupt at any point, and — because trainers resume from
their last checkpoint with step-indexed randomness and every output is written atomically — the final synthetic
sets, weights and metric tables must be bit-identical to those of a run that was never interrupted (the CPU
determinism promise of the README).
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO
from test_data import _folder_cfg, _write_pair
from test_workflow import E2E_CONFIG, SNAKEMAKE, snakemake

# Wall times, not results: they legitimately differ between two runs (cost.parquet is nothing but timings).
TIMING_COLUMNS = {"train_s", "seconds", "seconds_per_image", "s_per_img", "wall_s"}
TIMING_TABLES = {"cost.parquet"}


def start_run(cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.Popen([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml", "--cores", "2",
                             "--rerun-incomplete"], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def assert_nothing_on_disk_is_corrupt(results: Path) -> None:
    """Every output a rerun could pick up must load: atomic writes leave only complete files under real names."""
    for path in results.rglob("*"):
        if path.name.startswith(".") or any(part.startswith(".") for part in path.relative_to(results).parts):
            continue  # temporary names of writes that the kill interrupted; never taken as outputs
        if path.suffix == ".parquet":
            pd.read_parquet(path)
        elif path.suffix == ".npy":
            np.load(path)
        elif path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=False)


def assert_same_results(reference: Path, resumed: Path) -> None:
    ref_files = {p.relative_to(reference) for p in reference.rglob("*") if p.is_file() and not p.name.startswith(".")}
    new_files = {p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert ref_files == new_files
    compared = 0
    for rel in sorted(ref_files):
        a, b = reference / rel, resumed / rel
        if rel.suffix == ".npy":
            assert np.array_equal(np.load(a), np.load(b)), rel
        elif rel.suffix == ".parquet" and rel.name not in TIMING_TABLES:
            fa, fb = pd.read_parquet(a), pd.read_parquet(b)
            keep = [c for c in fa.columns if c not in TIMING_COLUMNS]
            pd.testing.assert_frame_equal(fa[keep], fb[keep], check_exact=True, obj=str(rel))
        elif rel.suffix in (".pt", ".safetensors", ".bin") and "checkpoint" not in str(rel):
            if rel.suffix == ".safetensors":
                from safetensors.torch import load_file
                sa, sb = load_file(a), load_file(b)
            else:
                sa, sb = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
            if isinstance(sa, dict):
                sa = {k: v for k, v in sa.items() if isinstance(v, torch.Tensor)}
                sb = {k: v for k, v in sb.items() if isinstance(v, torch.Tensor)}
                assert sa.keys() == sb.keys(), rel
                assert all(torch.equal(sa[k], sb[k]) for k in sa), rel
        else:
            continue
        compared += 1
    assert compared > 20  # synthetic sets, weights, evaluations and tables were all compared


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun_gives_the_uninterrupted_results(tmp_path, e2e_reference):
    seed = int(os.environ.get("SEGSYNTH_KILL_SEED", time.time_ns() % 10_000))
    print(f"kill points drawn with SEGSYNTH_KILL_SEED={seed}")  # shown on failure: rerun with the same points
    rng = random.Random(seed)

    # the reference: the shared uninterrupted run of the same config (conftest.e2e_reference), only read here
    reference, killed = e2e_reference, tmp_path / "killed"
    killed.mkdir()
    shutil.copy(E2E_CONFIG, killed / "config.yaml")

    kills = 0
    for _ in range(3):
        process = start_run(killed)
        try:
            process.wait(timeout=rng.uniform(8.0, 45.0))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # snakemake and every job it started, mid-write or not
            process.wait()
            kills += 1
        if (killed / "results").exists():
            assert_nothing_on_disk_is_corrupt(killed / "results")
        unlock = snakemake("--configfile", "config.yaml", "--unlock", cwd=killed, timeout=120)
        assert unlock.returncode == 0, unlock.stderr[-2000:]
    assert kills >= 1

    rerun = snakemake("--configfile", "config.yaml", "--cores", "2", "--rerun-incomplete", cwd=killed)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    done = snakemake("-n", "--configfile", "config.yaml", cwd=killed, timeout=120)
    assert "Nothing to be done" in done.stdout + done.stderr
    assert_same_results(reference / "results", killed / "results")


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "images" / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png"), "cannot read image"),
    (lambda root: (root / "masks" / "img3.png").unlink(), "no mask with stem 'img3'"),
    (lambda root: Image.fromarray(np.zeros((16, 24), np.uint8)).save(root / "masks" / "img1.png"), "mask size 24x16"),
    (lambda root: _write_pair(root, "img4", mask_value=128), "non-binary mask: values [128]"),
    (lambda root: _write_pair(root, "img5", image_ext=".jpg"), "duplicate sample id 'img5'"),
], ids=["corrupt_image", "missing_mask", "size_mismatch", "non_binary_mask", "duplicate_id"])
def test_bad_input_fails_the_workflow_naming_the_file_and_leaves_no_output(tmp_path, damage, message):
    """What a user sees: the splits job fails, its log names the file and the problem, nothing is left behind."""
    root = tmp_path / "src"
    root.mkdir()
    for i in range(6):
        _write_pair(root, f"img{i}")
    damage(root)
    config = {"run": {"datasets": ["toy"]}, "datasets": {"toy": {**_folder_cfg(root), "test_fraction": 0.5}}}
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(E2E_CONFIG, tmp_path / "config.yaml")
    result = snakemake("--configfile", "config.yaml", "toy.yaml", "--cores", "1", "results/toy/data", cwd=tmp_path,
                       timeout=300)
    assert result.returncode != 0
    log = (tmp_path / "logs" / "toy" / "splits.log").read_text()
    assert message in log and str(root) in log
    assert not (tmp_path / "results" / "toy").exists() or not any((tmp_path / "results" / "toy").iterdir())
