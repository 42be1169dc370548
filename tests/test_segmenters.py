"""Segmenter registry, deterministic and resumable training, save/load, the value model, train_segmenter."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import toy_arrays

from segsynth.data import canonical
from segsynth.errors import ConfigError, InputDataError
from segsynth.segmenters import (MonaiBasicUNet, MonaiUNet, get_segmenter_class, load_segmenter,
                                 train_segmenter)
from segsynth.training import Checkpointer

CLASS_NAMES = ["background", "square", "bar"]
UNET_CFG = {"kind": "monai_unet", "channels": [4, 8], "strides": [2], "num_res_units": 1, "steps": 6,
            "batch_size": 4, "lr": 1e-2, "weight_decay": 1e-4, "checkpoint_every": 3, "augment": True}
BASIC_CFG = {"kind": "monai_basicunet", "features": [4, 4, 4, 4, 4, 4], "steps": 2, "batch_size": 2,
             "lr": 1e-3, "weight_decay": 1e-4, "checkpoint_every": 0, "augment": False}


def write_dataset(directory, n_train: int = 8, n_test: int = 4):
    """A canonical dataset directory written by hand (the four files of the contract)."""
    images, masks = toy_arrays(n_train + n_test)
    n = n_train + n_test
    index = pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(n)], "case_id": [f"c{i // 2}" for i in range(n)],
        "split": ["train"] * n_train + ["test"] * n_test, "source_file": "toy.nii.gz", "slice_index": np.arange(n)})
    directory.mkdir(parents=True)
    np.save(directory / "images.npy", images)
    np.save(directory / "masks.npy", masks)
    index.to_parquet(directory / "index.parquet", index=False)
    meta = {"dataset": "toy", "kind": "toy", "class_names": CLASS_NAMES, "channels": 1, "resolution": [16, 16],
            "format_version": canonical.FORMAT_VERSION, "n_train": n_train, "n_test": n_test}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def write_synthetic(directory, n: int = 4, seed: int = 1, size: int = 16):
    images, masks = toy_arrays(n, seed=seed, size=size)
    directory.mkdir(parents=True)
    np.save(directory / "images.npy", images)
    np.save(directory / "masks.npy", masks)
    pd.DataFrame({"sample_id": [f"g{i}" for i in range(n)],
                  "source_sample_id": [f"s{i}" for i in range(n)]}).to_parquet(directory / "records.parquet")
    (directory / "meta.json").write_text(json.dumps({"method": "toy"}))
    return directory


def weights(segmenter) -> dict:
    return {name: tensor.clone() for name, tensor in segmenter.network.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def train_unet(tmp_path, seed: int, name: str, cfg: dict = UNET_CFG) -> tuple[MonaiUNet, dict]:
    images, masks = toy_arrays(10)
    segmenter = MonaiUNet(cfg, 1, len(CLASS_NAMES), CLASS_NAMES, device="cpu")
    stats = segmenter.train(images, masks, tmp_path / name, seed=seed)
    return segmenter, stats


def test_registry_knows_monai_nets_and_names_unknown_kinds():
    assert get_segmenter_class("monai_unet") is MonaiUNet
    assert get_segmenter_class("monai_basicunet") is MonaiBasicUNet
    with pytest.raises(ConfigError, match="nnformer.*monai_basicunet.*monai_unet.*nnunet"):
        get_segmenter_class("nnformer")


def test_training_is_deterministic_per_seed(tmp_path):
    first, stats = train_unet(tmp_path, seed=3, name="a")
    second, _ = train_unet(tmp_path, seed=3, name="b")
    other, _ = train_unet(tmp_path, seed=4, name="c")
    assert_same_weights(weights(first), weights(second))
    assert not all(torch.equal(a, b) for a, b in zip(weights(first).values(), weights(other).values()))
    assert stats["steps"] == 6 and stats["resumed_from_step"] == 0 and np.isfinite(stats["final_loss"])


def test_killed_training_resumes_to_identical_weights(tmp_path, monkeypatch):
    uninterrupted, _ = train_unet(tmp_path, seed=5, name="full")

    class Killed(Exception):
        pass

    original_save = Checkpointer.save

    def save_then_die(self, step, extra=None):
        original_save(self, step, extra)
        raise Killed(step)

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Killed):
        train_unet(tmp_path, seed=5, name="resumed")
    monkeypatch.setattr(Checkpointer, "save", original_save)

    resumed, stats = train_unet(tmp_path, seed=5, name="resumed")
    assert stats["resumed_from_step"] == 3 and stats["steps"] == 6
    assert_same_weights(weights(uninterrupted), weights(resumed))


def test_save_load_round_trip_and_probabilities(tmp_path):
    segmenter, _ = train_unet(tmp_path, seed=0, name="ckpt")
    segmenter.save(tmp_path / "model", train_stats={"steps": 6})
    meta = json.loads((tmp_path / "model" / "meta.json").read_text())
    assert meta == {"kind": "monai_unet", "cfg": UNET_CFG, "in_channels": 1, "num_classes": 3,
                    "class_names": CLASS_NAMES}
    assert json.loads((tmp_path / "model" / "train_stats.json").read_text()) == {"steps": 6}

    loaded = load_segmenter(tmp_path / "model")
    assert isinstance(loaded, MonaiUNet)
    images, _ = toy_arrays(5, seed=9)
    proba = segmenter.predict_proba(images, batch_size=2)
    assert proba.shape == (5, 3, 16, 16) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(loaded.predict_proba(images, batch_size=2), proba)
    with pytest.raises(InputDataError, match="not 'monai_basicunet'"):
        MonaiBasicUNet.load(tmp_path / "model")


def test_value_model_is_frozen_differentiable_and_takes_generator_range(tmp_path):
    segmenter, _ = train_unet(tmp_path, seed=0, name="ckpt")
    value_model = segmenter.as_value_model()
    assert not value_model.training
    assert not any(p.requires_grad for p in value_model.parameters())
    assert all(p.requires_grad for p in segmenter.network.parameters())

    images, _ = toy_arrays(2, seed=2)
    x = torch.from_numpy(images * 2.0 - 1.0).requires_grad_(True)
    probs = value_model(x)
    np.testing.assert_allclose(probs.detach().numpy(), segmenter.predict_proba(images), atol=1e-5)
    probs[:, 1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_basic_unet_trains_and_reloads(tmp_path):
    images, masks = toy_arrays(4, size=32)
    segmenter = MonaiBasicUNet(BASIC_CFG, 1, 3, CLASS_NAMES, device="cpu")
    segmenter.train(images, masks, tmp_path / "ckpt", seed=0)
    segmenter.save(tmp_path / "model")
    np.testing.assert_array_equal(load_segmenter(tmp_path / "model").predict_proba(images),
                                  segmenter.predict_proba(images))


def test_resolution_must_fit_the_strides():
    images, masks = toy_arrays(2, size=15)
    with pytest.raises(ConfigError, match="15x15 is not a multiple of 2 of at least 4"):
        MonaiUNet(UNET_CFG, 1, 3, device="cpu").train(images, masks, "unused", seed=0)


def test_train_segmenter_pools_real_and_synthetic(tmp_path):
    data_dir = write_dataset(tmp_path / "data")
    synthetic = [write_synthetic(tmp_path / "syn_a"), write_synthetic(tmp_path / "syn_b", n=3, seed=2)]
    out_dir = tmp_path / "models" / "unet_s0"
    train_segmenter(UNET_CFG, data_dir, out_dir, seed=0, synthetic_dirs=synthetic)

    stats = json.loads((out_dir / "train_stats.json").read_text())
    assert (stats["n_real"], stats["n_synthetic"], stats["num_samples"], stats["steps"]) == (8, 7, 15, 6)
    assert not (tmp_path / "models" / "unet_s0.ckpt").exists()
    assert load_segmenter(out_dir).class_names == CLASS_NAMES


def test_train_segmenter_rejects_incompatible_synthetic_set(tmp_path):
    data_dir = write_dataset(tmp_path / "data")
    bad = write_synthetic(tmp_path / "syn", size=32)
    with pytest.raises(InputDataError, match="syn/images.npy"):
        train_segmenter(UNET_CFG, data_dir, tmp_path / "model", seed=0, synthetic_dirs=[bad])


def test_a_synthetic_only_segmenter_sees_no_real_image(tmp_path, tiny_data):
    """include_real=False (rule train_segmenter_synthetic_only): the synthetic set alone, from scratch."""
    import json

    from segsynth.data.canonical import load_split

    train = load_split(tiny_data, "train")
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    np.save(synthetic / "images.npy", train.images[:5])
    np.save(synthetic / "masks.npy", train.masks[:5])
    pd.DataFrame({"sample_id": [f"g{i}" for i in range(5)]}).to_parquet(synthetic / "records.parquet")
    cfg = {"kind": "monai_unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "steps": 2,
           "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "checkpoint_every": 1, "augment": False,
           "protocol": "continue", "continue_steps": 2}
    train_segmenter(cfg, tiny_data, tmp_path / "alone", seed=0, synthetic_dirs=[synthetic], include_real=False)
    stats = json.loads((tmp_path / "alone" / "train_stats.json").read_text())
    assert stats["n_real"] == 0 and stats["n_synthetic"] == 5 and stats["num_samples"] == 5
    with pytest.raises(ConfigError, match="at least one synthetic set"):
        train_segmenter(cfg, tiny_data, tmp_path / "none", seed=0, include_real=False)
    assert not (tmp_path / "none").exists()
