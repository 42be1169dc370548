"""The nnU-Net v2 segmenter (kind ``nnunet``): raw export, splits, train/predict/save/load, value model,
resume after a kill, and that nnU-Net's path settings never leak out of a job.

Trainings use the "short" trainer (2–3 epochs of a few iterations) on 64² blob images; the whole file
takes about a minute on one CPU thread.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segsynth.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "ring", "core"]
SHORT = {"kind": "nnunet", "trainer": "short", "epochs": 2, "iterations_per_epoch": 3, "val_iterations_per_epoch": 1,
         "checkpoint_every": 1, "data_workers": 0, "use_mirroring": False}


def blobs(n: int, size: int = 64, seed: int = 0):
    """Images in (0, 1] (no zero pixels, so nnU-Net crops nothing) with nested-disc masks of 3 classes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        r = rng.uniform(size * 0.2, size * 0.35)
        dist = np.hypot(yy - cy, xx - cx)
        mask = (dist < r).astype(np.uint8) + (dist < r / 2)
        images.append(np.clip(np.choose(mask, [0.1, 0.5, 0.9]) + rng.normal(0, 0.03, mask.shape), 0.01, 1)[None])
        masks.append(mask)
    return np.stack(images).astype(np.float32), np.stack(masks).astype(np.uint8)


def nnunet_env() -> set:
    return {k for k in os.environ if k.startswith("nnUNet")}


def segmenter(cfg=None, channels=1):
    from segsynth.segmenters.nnunet import NnUNetSegmenter

    return NnUNetSegmenter({**SHORT, **(cfg or {})}, channels, len(CLASSES), CLASSES)


# --- export, splits, config ------------------------------------------------------------------------


def test_export_round_trip_and_splits(tmp_path):
    from segsynth.data.adapters import prepare_dataset
    from segsynth.data.canonical import load_split, read_meta

    images, masks = blobs(10, size=32)
    seg = segmenter()
    root = tmp_path / "Dataset501_segsynth"
    cases = seg.export_raw(images, masks, root, synthetic_from=6)
    assert cases[:6] == [f"real_{i:05d}" for i in range(6)] and cases[6:] == [f"synth_{i:05d}" for i in range(4)]

    spec = json.loads((root / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "zscore"}
    assert spec["labels"] == {"background": 0, "ring": 1, "core": 2}
    assert spec["numTraining"] == 10 and spec["file_ending"] == ".tif"
    assert spec["overwrite_image_reader_writer"] == "NaturalImage2DIO"
    for i, case in enumerate(cases):  # float32 TIFF: bit-exact images, exact labels
        image = np.asarray(Image.open(root / "imagesTr" / f"{case}_0000.tif"))
        label = np.asarray(Image.open(root / "labelsTr" / f"{case}.tif"))
        assert image.dtype == np.float32 and image.shape == (32, 32)
        np.testing.assert_array_equal(image, images[i, 0])
        np.testing.assert_array_equal(label, masks[i])

    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    data, props = NaturalImage2DIO().read_images([str(root / "imagesTr" / f"{cases[3]}_0000.tif")])
    assert data.shape == (1, 1, 32, 32) and props["spacing"] == (999, 1, 1)
    np.testing.assert_array_equal(data[0, 0], images[3, 0])

    # the project's own nnU-Net raw reader gives back the same slices and labels
    out = tmp_path / "canonical"
    prepare_dataset("rt", {"kind": "nnunet_raw", "root": str(root), "resolution": 32,
                           "intensity": {"mode": "window", "window": [0, 1]}}, out)
    assert read_meta(out)["class_names"] == CLASSES
    back = load_split(out, "all")
    assert back.images.shape == (10, 1, 32, 32)
    for row, case in enumerate(back.index.case_id):
        i = cases.index(case)
        np.testing.assert_array_equal(back.masks[row], masks[i])
        np.testing.assert_allclose(back.images[row], images[i], atol=1e-6)

    splits = seg.splits(cases)
    real, synthetic = set(cases[:6]), set(cases[6:])
    assert len(splits) == 5
    for fold in splits:
        assert synthetic <= set(fold["train"]), "a synthetic case is missing from a training fold"
        assert set(fold["val"]) <= real, "a synthetic case is in a validation fold"
        assert not set(fold["val"]) & set(fold["train"])
    assert set().union(*(set(f["val"]) for f in splits)) == real  # every real case validated once

    # RGB: three float TIFFs per case on nnU-Net's 0-255 scale
    rgb = segmenter({"normalization": "rgb_to_0_1"}, channels=3)
    rgb.export_raw(np.repeat(images[:2], 3, axis=1), masks[:2], tmp_path / "rgb")
    assert json.loads((tmp_path / "rgb" / "dataset.json").read_text())["channel_names"] == {
        "0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1"}
    np.testing.assert_allclose(np.asarray(Image.open(tmp_path / "rgb" / "imagesTr" / "real_00001_0002.tif")),
                               images[1, 0] * 255, rtol=1e-6)


@pytest.mark.parametrize("cfg, match", [
    ({"trainer": "long"}, "trainer"),
    ({"configuration": "3d_fullres"}, "configuration"),
    ({"fold": 7}, "fold"),
    ({"fold": "0"}, "fold"),
    ({"epochs": 0}, "epochs"),
    ({"normalization": "MRI_please"}, "normalization"),
    ({"tile_step_size": 0}, "tile_step_size"),
    ({"data_workers": -1}, "data_workers"),
    ({"learning_rate": 1e-3}, "unknown nnunet keys"),
    ({"trainer": "standard", "steps": 10}, "needs trainer 'short'"),
])
def test_bad_config_is_named(cfg, match):
    with pytest.raises(ConfigError, match=match):
        segmenter(cfg)


def test_steps_budget_becomes_whole_epochs():
    assert segmenter({"steps": 7, "iterations_per_epoch": 3}).options["epochs"] == 3


def test_rgb_scheme_needs_three_channels():
    with pytest.raises(ConfigError, match="3 channels"):
        segmenter({"normalization": "rgb_to_0_1"}, channels=1)


def test_integer_fold_needs_real_cases(tmp_path):
    seg = segmenter({"fold": 0})
    with pytest.raises(ConfigError, match="fold 0 needs at least 2 real cases"):
        seg.splits(["real_00000", "synth_00000", "synth_00001"])
    images, masks = blobs(3, size=32)
    with pytest.raises(ConfigError, match="validates on real cases"):
        seg.train(images, masks, tmp_path / "ckpt", seed=0, synthetic_from=0)


# --- paths never leak ------------------------------------------------------------------------------


def test_paths_are_restored_even_after_an_error(tmp_path):
    from segsynth.segmenters.nnunet import PATH_NAMES, nnunet_paths

    import nnunetv2.paths as paths
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    before_env, before = nnunet_env(), {n: getattr(paths, n) for n in PATH_NAMES}
    with pytest.raises(KeyError):
        with nnunet_paths(tmp_path / "r", tmp_path / "p", tmp_path / "q"):
            assert os.fspath(paths.nnUNet_raw) == str(tmp_path / "r")
            assert os.fspath(trainer_module.nnUNet_results) == str(tmp_path / "q")
            assert "nnUNet_raw" not in os.environ or os.environ["nnUNet_raw"] != str(tmp_path / "r")
            raise KeyError("boom")
    assert nnunet_env() == before_env
    assert all(getattr(paths, n) is before[n] for n in PATH_NAMES)
    assert trainer_module.nnUNet_results is before["nnUNet_results"]


# --- end to end ------------------------------------------------------------------------------------


def test_train_predict_save_load_value_model(tmp_path):
    from segsynth.segmenters.nnunet import NnUNetSegmenter, PATH_NAMES

    import nnunetv2.paths as paths

    env_before, paths_before = nnunet_env(), {n: getattr(paths, n) for n in PATH_NAMES}
    images, masks = blobs(12)
    seg = segmenter()
    stats = seg.train(images, masks, tmp_path / "ckpt", seed=3, synthetic_from=9)
    assert stats["epochs"] == 2 and stats["steps"] == 6 and stats["resumed_from_epoch"] == 0
    assert stats["num_samples"] == 12 and stats["n_synthetic_cases"] == 3 and np.isfinite(stats["final_loss"])
    splits = json.loads((tmp_path / "ckpt/nnunet/nnUNet_preprocessed/Dataset501_segsynth/splits_final.json").read_text())
    assert all(set(f["val"]) <= {f"real_{i:05d}" for i in range(9)} for f in splits)

    probabilities = seg.predict_proba(images[:4])
    assert probabilities.shape == (4, 3, 64, 64) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)

    seg.save(tmp_path / "model", train_stats=stats)
    model_dir = tmp_path / "model" / "nnunet"
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json", "fold_all/checkpoint_final.pth"):
        assert (model_dir / name).exists(), name
    loaded = NnUNetSegmenter.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict_proba(images[:4]), probabilities)

    # value model: gradients reach the input (on the device the model loads to: the GPU on a GPU node)
    value_model = loaded.as_value_model()
    assert not any(p.requires_grad for p in value_model.parameters())
    device = next(value_model.parameters()).device
    x = torch.from_numpy(images[:4] * 2 - 1).to(device).requires_grad_(True)
    out = value_model(x)
    assert out.shape == (4, 3, 64, 64) and out.device == device
    out[:, 1].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0

    # The tight comparisons below run in float32 on the CPU: on CUDA nnU-Net's own predictor runs under float16
    # autocast, which the tolerances below do not model.
    loaded = NnUNetSegmenter.load(tmp_path / "model")
    loaded.device = torch.device("cpu")
    value_model = loaded.as_value_model()

    # value model = nnU-Net's network on nnU-Net's own preprocessing, in float32 (tight)
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

    plans_manager, configuration_manager = loaded._managers()
    adapter = PreprocessAdapterFromNpy([images[0][:, None]], [None], [{"spacing": [999.0, 1.0, 1.0]}], [None],
                                       plans_manager, loaded._model["dataset_json"], configuration_manager)
    preprocessed = next(adapter)["data"][:, 0]
    with torch.no_grad():
        logits = loaded.network()(preprocessed[None].float())
        reference = torch.softmax(logits, dim=1)[0].numpy()
        ours = value_model(torch.from_numpy(images[:1] * 2 - 1))[0].numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)

    # ... and predict_proba (mirroring off) within nnU-Net's float16 logit accumulation: the sliding
    # window stores gaussian-weighted logits and their weights in float16 and divides them in float16,
    # two roundings of relative size <= 2**-11 each, so |Δlogit| <= 2 * 2**-11 * max|logit|, and the
    # softmax moves a probability by at most 2 * max|Δlogit|. One image has a zero frame, which
    # nnU-Net crops away (background outside the box) and the value model crops the same way.
    framed = images[:4].copy()
    framed[1, :, :5], framed[1, :, :, -7:] = 0.0, 0.0
    with torch.no_grad():
        ours = value_model(torch.from_numpy(framed * 2 - 1)).numpy()
        zscored = (framed - framed.mean(axis=(2, 3), keepdims=True)) / framed.std(axis=(2, 3), keepdims=True)
        max_logit = float(loaded.network()(torch.from_numpy(zscored)).abs().max())  # scale of the logits
    reference = loaded.predict_proba(framed)
    tolerance = 4 * 2 ** -11 * max(max_logit, 8.0) + 1e-5
    assert np.abs(ours - reference).max() <= tolerance, (np.abs(ours - reference).max(), tolerance)
    assert np.all(ours[1, 0, :5] == 1.0) and np.all(reference[1, 0, :5] == 1.0)

    # no nnU-Net setting leaked out of train / predict / save / load
    assert nnunet_env() == env_before
    assert all(getattr(paths, n) is paths_before[n] for n in PATH_NAMES)
    for name, module in list(sys.modules.items()):
        if name.startswith("nnunetv2") and module is not None:
            for attr in PATH_NAMES:
                if attr in vars(module):
                    assert vars(module)[attr] is paths_before[attr], f"{name}.{attr} still patched"

    # same seed, same data, one CPU thread, no augmentation workers: the same network (bit for bit on the CPU;
    # on CUDA cuDNN's benchmarked, non-deterministic kernels leave rounding-level differences)
    again = segmenter()
    again.train(images, masks, tmp_path / "ckpt2", seed=3, synthetic_from=9)
    tolerance = {"rtol": 0, "atol": 0} if seg.device.type == "cpu" else {"rtol": 1e-3, "atol": 1e-5}
    for key, value in seg._model["checkpoint"]["network_weights"].items():
        torch.testing.assert_close(again._model["checkpoint"]["network_weights"][key], value, **tolerance)


RUNNER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from test_nnunet import blobs, segmenter

    if __name__ == "__main__":
        torch.set_num_threads(1)
        images, masks = blobs(12)
        segmenter({cfg!r}).train(images, masks, {ckpt!r}, seed=1, synthetic_from=10)
""")


def test_resume_after_kill_ends_at_the_same_epoch(tmp_path):
    cfg = {"epochs": 3, "iterations_per_epoch": 12, "val_iterations_per_epoch": 1, "checkpoint_every": 1}
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "run.py"
    script.write_text(RUNNER.format(repo=str(REPO), tests=str(Path(__file__).parent), cfg=cfg, ckpt=str(ckpt)))
    fold = ckpt / "nnunet/nnUNet_results/Dataset501_segsynth/nnUNetTrainerSegsynthShort__nnUNetPlans__2d/fold_all"
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 150
        while not (fold / "checkpoint_latest.pth").exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint_latest.pth in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert not (fold / "checkpoint_final.pth").exists(), "the run finished before it could be killed"

    stats = segmenter(cfg).train(*blobs(12), ckpt, seed=1, synthetic_from=10)
    assert 1 <= stats["resumed_from_epoch"] < 3
    assert stats["epochs"] == 3 and stats["steps"] == 36
    assert torch.load(fold / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 3
    assert not (fold / "checkpoint_latest.pth").exists()
    # a second call finds the finished training and does not train again
    again = segmenter(cfg).train(*blobs(12), ckpt, seed=1, synthetic_from=10)
    assert again["resumed_from_epoch"] == 3 and again["epochs"] == 3 and again["prepare_seconds"] == 0.0
