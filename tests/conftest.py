"""Shared test set-up: one torch thread per test process, a quiet environment, repository paths."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(1)


@pytest.fixture
def repo_root():
    return REPO


def make_tiny_dataset(directory, n: int = 12, size: int = 16, channels: int = 1, seed: int = 0):
    """A small canonical dataset with 3 classes: two nested discs whose intensity depends on the class."""
    import numpy as np
    import pandas as pd

    from segsynth.data.canonical import write_canonical

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks, images = [], []
    for _ in range(n):
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        r = rng.uniform(size * 0.2, size * 0.35)
        dist = np.hypot(yy - cy, xx - cx)
        mask = np.where(dist < r, 1, 0) + (dist < r / 2)
        masks.append(mask.astype(np.uint8))
        image = np.choose(mask, [0.1, 0.5, 0.9]) + rng.normal(0, 0.03, mask.shape)
        images.append(np.repeat(np.clip(image, 0, 1)[None], channels, 0))
    index = pd.DataFrame({"sample_id": [f"tiny_{i:03d}" for i in range(n)],
                          "case_id": [f"case_{i:03d}" for i in range(n)],
                          "split": ["test" if i % 3 == 2 else "train" for i in range(n)],
                          "source_file": "generated", "slice_index": -1})
    write_canonical(directory, np.stack(images).astype(np.float32), np.stack(masks), index,
                    {"dataset": "tiny", "kind": "test", "class_names": ["background", "ring", "core"]})
    return directory


TINY_GENERATOR = {
    "pretrained": None,
    "beta_schedule": "squaredcos_cap_v2",
    "unet": {"block_out_channels": [8, 16], "layers_per_block": 1, "cross_attention_dim": 8,
             "attention_head_dim": 4, "norm_num_groups": 4},
    "training": {"steps": 4, "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0,
                 "grad_clip": 1.0, "ema_decay": 0.9, "prompt_dropout": 0.5, "hflip": True,
                 "train_unet": True, "checkpoint_every": 2},
}


def toy_arrays(n: int, seed: int = 0, size: int = 16, square: int = 5):
    """Segmenter toy data: images whose bright square is class 1 and dim bar class 2, at random places."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.1, size=(n, 1, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        r, c = rng.integers(0, size - square, size=2)
        masks[i, r:r + square, c:c + square] = 1
        images[i, 0, r:r + square, c:c + square] = 0.9
        col = rng.integers(0, size)
        masks[i, :, col][masks[i, :, col] == 0] = 2
        images[i, 0, :, col][masks[i, :, col] == 2] = 0.5
    return images, masks


@pytest.fixture
def tiny_data(tmp_path):
    return make_tiny_dataset(tmp_path / "data")


@pytest.fixture
def tiny_generator_cfg():
    import copy

    return copy.deepcopy(TINY_GENERATOR)


def train_tiny_models(root, segmenter_cfg: dict, generator_cfg: dict | None = None):
    """A tiny dataset, generator and segmenter f_θ trained under ``root``; returns their three directories."""
    from segsynth.generator.train import train_generator
    from segsynth.segmenters import train_segmenter

    data = make_tiny_dataset(root / "data")
    train_generator(generator_cfg or TINY_GENERATOR, data, root / "gen", seed=0)
    train_segmenter(segmenter_cfg, data, root / "seg", seed=0)
    return data, root / "gen", root / "seg"


@pytest.fixture(scope="session")
def e2e_reference(tmp_path_factory):
    """One uninterrupted run of the whole DAG on tests/config/e2e.yaml, shared by the slow tier: the end-to-end
    test works on a copy of it, the kill test compares its killed-and-rerun results with it."""
    import shutil

    from test_workflow import E2E_CONFIG, snakemake

    workdir = tmp_path_factory.mktemp("e2e_reference")
    shutil.copy(E2E_CONFIG, workdir / "config.yaml")
    run = snakemake("--configfile", "config.yaml", "--cores", "2", cwd=workdir)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return workdir
