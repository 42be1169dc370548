"""The downstream training protocols (segsynth.segmenters.protocol): ``scratch`` unchanged, and ``continue``
(the Adversariality Miner paper's): start from the real-only weights, 1:1 real:synthetic batches, paired CutMix,
a validation split by case, the best-validated checkpoint saved; for the torch segmenters and nnU-Net."""

import ast
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, toy_arrays
from test_segmenters import UNET_CFG, write_dataset, write_synthetic

from segsynth.config import validate_config
from segsynth.errors import ConfigError
from segsynth.segmenters import (PROTOCOL_KEYS, MonaiUNet, TorchSegmenter, load_segmenter, real_only_settings,
                                 train_segmenter, validation_cases)
from segsynth.segmenters import protocol
from segsynth.training import Checkpointer

CLASSES = ["background", "square", "bar"]
CONTINUE = {**UNET_CFG, "protocol": "continue", "continue_steps": 6, "val_every": 2, "checkpoint_every": 2}


def weights_of(network: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def real_model(tmp_path):
    """A dataset (8 train rows = 4 cases of 2 slices), a synthetic set and the real-only model."""
    data = write_dataset(tmp_path / "data", n_train=8)
    synthetic = write_synthetic(tmp_path / "syn", n=4)
    train_segmenter(CONTINUE, data, tmp_path / "real", seed=0)  # real-only: the protocol does not apply
    return data, synthetic, tmp_path / "real"


def continue_run(tmp_path, real_model, name: str, cfg: dict = CONTINUE, seed: int = 0) -> Path:
    data, synthetic, real = real_model
    train_segmenter(cfg, data, tmp_path / name, seed=seed, synthetic_dirs=[synthetic], init_dir=real)
    return tmp_path / name


# --- scratch is today's behaviour; the real-only model ignores the protocol ---------------------------


def test_scratch_is_unchanged_and_the_real_only_model_ignores_the_protocol(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=8)
    synthetic = write_synthetic(tmp_path / "syn")
    train_segmenter(UNET_CFG, data, tmp_path / "plain", seed=0, synthetic_dirs=[synthetic])
    train_segmenter({**UNET_CFG, "protocol": "scratch", "cutmix_p": 1.0}, data, tmp_path / "scratch", seed=0,
                    synthetic_dirs=[synthetic])
    assert_same(load_segmenter(tmp_path / "plain").network.state_dict(),
                load_segmenter(tmp_path / "scratch").network.state_dict())
    plain = json.loads((tmp_path / "plain" / "train_stats.json").read_text())
    assert "protocol" not in plain and plain["n_real"] == 8 and plain["n_synthetic"] == 4

    # the real-only model of a continue segmenter is the real-only model of a scratch one
    train_segmenter(UNET_CFG, data, tmp_path / "real_a", seed=0)
    train_segmenter(CONTINUE, data, tmp_path / "real_b", seed=0)
    assert_same(load_segmenter(tmp_path / "real_a").network.state_dict(),
                load_segmenter(tmp_path / "real_b").network.state_dict())
    assert real_only_settings(CONTINUE) == {k: v for k, v in UNET_CFG.items()} | {"checkpoint_every": 2}


def test_protocol_arguments_are_checked(tmp_path, real_model):
    data, synthetic, real = real_model
    with pytest.raises(ConfigError, match="only used by protocol 'continue'"):
        train_segmenter(UNET_CFG, data, tmp_path / "m", seed=0, synthetic_dirs=[synthetic], init_dir=real)
    with pytest.raises(ConfigError, match="needs the real-only model"):
        train_segmenter(CONTINUE, data, tmp_path / "m", seed=0, synthetic_dirs=[synthetic])
    with pytest.raises(ConfigError, match="protocol"):
        train_segmenter({**UNET_CFG, "protocol": "finetune"}, data, tmp_path / "m", seed=0)
    with pytest.raises(ConfigError, match="even batch size"):
        continue_run(tmp_path, real_model, "odd", {**CONTINUE, "batch_size": 3})
    with pytest.raises(ConfigError, match="cutmix_p"):
        continue_run(tmp_path, real_model, "p", {**CONTINUE, "cutmix_p": 1.5})


# --- continue: the start, the batches, CutMix --------------------------------------------------------------


def test_continue_starts_from_the_real_only_weights(tmp_path, real_model, monkeypatch):
    _, _, real = real_model
    real_weights = load_segmenter(real).network.state_dict()
    # no continuation steps: the saved model is the real-only one
    zero = continue_run(tmp_path, real_model, "zero", {**CONTINUE, "continue_steps": 0})
    assert_same(load_segmenter(zero).network.state_dict(), real_weights)

    starts = []
    original = TorchSegmenter._paired_batch

    def spy(self, *args, **kwargs):
        if not starts:
            starts.append(weights_of(self.network))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TorchSegmenter, "_paired_batch", spy)
    trained = continue_run(tmp_path, real_model, "trained")
    assert_same(starts[0], real_weights)  # the first step starts from the real-only weights
    assert differs(load_segmenter(trained).network.state_dict(), real_weights)
    stats = json.loads((trained / "train_stats.json").read_text())
    assert stats["protocol"] == "continue" and stats["init_dir"] == str(real) and stats["steps"] == 6


def test_batches_are_half_real_half_synthetic(tmp_path, monkeypatch):
    images, masks = toy_arrays(12)
    real_images, synthetic_images = images[:8] * 0.45, 0.5 + images[8:] * 0.5  # real < 0.5 <= synthetic
    segmenter = MonaiUNet({**CONTINUE, "cutmix_p": 0.0}, 1, 3, CLASSES, device="cpu")
    batches = []
    original = TorchSegmenter._paired_batch

    def spy(self, *args, **kwargs):
        batch = original(self, *args, **kwargs)
        batches.append(batch)
        return batch

    monkeypatch.setattr(TorchSegmenter, "_paired_batch", spy)
    real_only = MonaiUNet(UNET_CFG, 1, 3, CLASSES, device="cpu")
    real_only.train(images, masks, tmp_path / "c0", seed=0, log_every=0)
    real_only.save(tmp_path / "init")
    segmenter.train_continue((real_images, masks[:8]), (synthetic_images, masks[8:]), (real_images[:2], masks[:2]),
                             tmp_path / "init", tmp_path / "ckpt", seed=0, log_every=0)
    assert len(batches) == 6
    for batch_images, batch_masks in batches:
        assert batch_images.shape[0] == 4 and batch_masks.shape == (4, 1, 16, 16)
        assert float(batch_images[:2].max()) < 0.5 <= float(batch_images[2:].min())


def test_paired_cutmix_swaps_one_box_of_image_and_mask():
    rng = np.random.default_rng(0)
    images = rng.random((6, 2, 20, 24)).astype(np.float32)
    masks = rng.integers(0, 3, size=(6, 20, 24))
    box = protocol.cutmix_box(lambda low, high: int(rng.integers(low, high + 1)), masks.shape[1:])
    mixed_images, mixed_masks = images.copy(), masks.copy()
    protocol.paired_cutmix(mixed_images, mixed_masks, 3, box)
    inside = np.zeros((20, 24), bool)
    inside[box] = True
    for i in range(6):
        partner = (i + 3) % 6
        np.testing.assert_array_equal(mixed_images[i][:, inside], images[partner][:, inside])
        np.testing.assert_array_equal(mixed_masks[i][inside], masks[partner][inside])
        np.testing.assert_array_equal(mixed_images[i][:, ~inside], images[i][:, ~inside])
        np.testing.assert_array_equal(mixed_masks[i][~inside], masks[i][~inside])
    # the same on torch tensors (nnU-Net's batches)
    tensor_images, tensor_masks = torch.from_numpy(images.copy()), torch.from_numpy(masks[:, None].copy())
    protocol.paired_cutmix(tensor_images, tensor_masks, 3, box)
    np.testing.assert_array_equal(tensor_images.numpy(), mixed_images)
    np.testing.assert_array_equal(tensor_masks[:, 0].numpy(), mixed_masks)
    # box sides: size//4 … 3·size//4, inside the image (the reference's bounds)
    for _ in range(200):
        for side, size in zip(protocol.cutmix_box(lambda lo, hi: int(rng.integers(lo, hi + 1)), (20, 24)), (20, 24)):
            assert size // 4 <= side.stop - side.start <= 3 * size // 4 and 0 <= side.start and side.stop <= size


def test_training_batches_keep_each_pasted_mask_with_its_image():
    images, masks = toy_arrays(12)
    real, synthetic = (images[:8], masks[:8]), (images[8:], masks[8:])
    segmenter = MonaiUNet({**CONTINUE, "augment": False}, 1, 3, CLASSES, device="cpu")
    fired = 0
    for step in range(20):
        plain_images, plain_masks = segmenter._paired_batch(real, synthetic, 3, step, cutmix_p=0.0)
        mixed_images, mixed_masks = segmenter._paired_batch(real, synthetic, 3, step, cutmix_p=1.0)
        changed = (mixed_images != plain_images).any(dim=(0, 1)) | (mixed_masks != plain_masks).any(dim=(0, 1))
        if not changed.any():
            continue
        fired += 1
        rows, cols = np.nonzero(changed.numpy())
        inside = np.zeros(changed.shape, bool)
        inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        for i in range(4):
            partner = (i + 2) % 4
            assert torch.equal(mixed_images[i][:, inside], plain_images[partner][:, inside])
            assert torch.equal(mixed_masks[i][:, inside], plain_masks[partner][:, inside])
            assert torch.equal(mixed_images[i][:, ~inside], plain_images[i][:, ~inside])
            assert torch.equal(mixed_masks[i][:, ~inside], plain_masks[i][:, ~inside])
    assert fired >= 15
    # cutmix_p = 0.5: about half of the batches
    hits = sum(not torch.equal(segmenter._paired_batch(real, synthetic, 3, s, 0.5)[1],
                               segmenter._paired_batch(real, synthetic, 3, s, 0.0)[1]) for s in range(200))
    assert 70 <= hits <= 130


# --- validation split, best checkpoint, resume -----------------------------------------------------------


def test_validation_split_is_by_case_fixed_and_disjoint_from_training(tmp_path, real_model, monkeypatch):
    cases = [f"p{i}" for i in range(40)]
    chosen = validation_cases(cases, 0.125)
    assert len(chosen) == 5 and chosen == validation_cases(list(reversed(cases)) * 2, 0.125)
    assert validation_cases(["a", "b"], 0.125) == {"a"} or validation_cases(["a", "b"], 0.125) == {"b"}
    with pytest.raises(ConfigError, match="at least 2"):
        validation_cases(["only"], 0.5)

    data, _, _ = real_model
    seen = {}
    original = TorchSegmenter.train_continue

    def spy(self, real, synthetic, validation, *args, **kwargs):
        seen["real"], seen["validation"] = real[0].copy(), validation[0].copy()
        return original(self, real, synthetic, validation, *args, **kwargs)

    monkeypatch.setattr(TorchSegmenter, "train_continue", spy)
    first = json.loads((continue_run(tmp_path, real_model, "a", seed=0) / "train_stats.json").read_text())
    other = json.loads((continue_run(tmp_path, real_model, "b", {**CONTINUE, "lr": 1e-3}, seed=7)
                        / "train_stats.json").read_text())
    assert first["val_cases"] == other["val_cases"] and len(first["val_cases"]) == 1  # round(4 · 0.125) → 1
    from segsynth.data.canonical import load_split

    train = load_split(data, "train")
    is_val = train.index["case_id"].isin(first["val_cases"]).to_numpy()
    assert is_val.sum() == 2  # both slices of the case
    np.testing.assert_array_equal(seen["validation"], train.images[is_val])
    np.testing.assert_array_equal(seen["real"], train.images[~is_val])
    assert first["n_real"] == 6 and first["n_val"] == 2


def test_the_best_validated_checkpoint_is_saved(tmp_path, real_model, monkeypatch):
    scores = iter([0.2, 0.9, 0.5])
    at_validation = []

    def scripted(self, images, masks, batch_size=32):
        at_validation.append(weights_of(self.network))
        return next(scores)

    monkeypatch.setattr(TorchSegmenter, "validation_dice", scripted)
    model = continue_run(tmp_path, real_model, "best")  # 6 steps, validations after steps 2, 4, 6
    stats = json.loads((model / "train_stats.json").read_text())
    assert stats["val_dice"] == [[2, 0.2], [4, 0.9], [6, 0.5]]
    assert stats["best_step"] == 4 and stats["best_val_dice"] == 0.9
    saved = load_segmenter(model).network.state_dict()
    assert_same(saved, at_validation[1])
    assert differs(saved, at_validation[2]) and differs(saved, at_validation[0])


def test_killed_continuation_resumes_to_identical_weights(tmp_path, real_model, monkeypatch):
    uninterrupted = continue_run(tmp_path, real_model, "full")

    class Killed(Exception):
        pass

    original_save = Checkpointer.save
    saves = []

    def save_then_die(self, step, extra=None):
        original_save(self, step, extra)
        saves.append(step)
        if step == 4:
            raise Killed(step)

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Killed):
        continue_run(tmp_path, real_model, "resumed")
    monkeypatch.setattr(Checkpointer, "save", original_save)
    resumed = continue_run(tmp_path, real_model, "resumed")
    stats = json.loads((resumed / "train_stats.json").read_text())
    assert saves == [2, 4] and stats["resumed_from_step"] == 4
    assert stats["val_dice"] == json.loads((uninterrupted / "train_stats.json").read_text())["val_dice"]
    assert_same(load_segmenter(resumed).network.state_dict(), load_segmenter(uninterrupted).network.state_dict())


# --- config, rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, extra", [
    ("unet", {"continue_steps": 100, "val_every": 10}), ("mk_unet", {"continue_steps": 0}), ("order", {}),
    ("swin_unet", {"val_fraction": 0.2}), ("nnunet", {"continue_epochs": 100, "val_every": 5}),
])
def test_schema_takes_the_protocol_keys_for_every_kind(repo_root, kind, extra):
    config = yaml.safe_load((repo_root / "config.yaml").read_text())
    config["segmenters"][kind].update({"protocol": "continue", "cutmix_p": 0.5, "val_fraction": 0.125, **extra})
    validate_config(config)
    for bad in ({"protocol": "finetune"}, {"cutmix_p": 2}, {"val_fraction": 1.0},
                {"continue_epochs" if kind != "nnunet" else "continue_steps": 5}):
        broken = copy.deepcopy(config)
        broken["segmenters"][kind].update(bad)
        with pytest.raises(ConfigError, match=f"segmenters.{kind}"):
            validate_config(broken)


def test_the_rules_know_the_protocol_keys_and_add_the_init_input_only_for_continue(tmp_path):
    rules = (REPO / "rules" / "segmenters.smk").read_text()
    listed = re.search(r"^SEGMENTER_PROTOCOL_KEYS = (\(.*?\))$", rules, flags=re.M).group(1)
    assert set(ast.literal_eval(listed)) == set(PROTOCOL_KEYS)

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["segmenters"]["unet"].update(protocol="continue", continue_steps=10)
    (tmp_path / "continue.yaml").write_text(yaml.safe_dump(config))
    outputs = {}
    for name, path in (("scratch", REPO / "config.yaml"), ("continue", tmp_path / "continue.yaml")):
        result = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"),
                                 "-n", "--configfile", str(path)], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        outputs[name] = result.stdout
    jobs = {name: re.findall(r"rule train_segmenter_augmented:\n    input: ([^\n]*)", text)
            for name, text in outputs.items()}
    assert jobs["scratch"] and len(jobs["scratch"]) == len(jobs["continue"])
    real = "results/mni152/segmenters/unet/real"
    assert not any(real in inputs for inputs in jobs["scratch"])
    assert all(inputs.endswith(real) for inputs in jobs["continue"])


# --- nnU-Net ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nnunet_real(tmp_path_factory):
    """A real-only nnU-Net model (the short trainer of test_nnunet) and the continuation's data."""
    from test_nnunet import SHORT, blobs

    from segsynth.segmenters.nnunet import NnUNetSegmenter

    root = tmp_path_factory.mktemp("nnunet")
    images, masks = blobs(16, size=32)
    cfg = {**SHORT, "protocol": "continue", "iterations_per_epoch": 2}
    seg = NnUNetSegmenter(cfg, 1, 3, ["background", "ring", "core"])
    seg.save(root / "real", train_stats=seg.train(images[:10], masks[:10], root / "ckpt_real", seed=0))
    parts = {"real": (images[:8], masks[:8]), "validation": (images[8:10], masks[8:10]),
             "synthetic": (images[10:], masks[10:])}
    return root, cfg, parts


def continue_nnunet(root, cfg, parts, name, **extra):
    from segsynth.segmenters.nnunet import NnUNetSegmenter

    seg = NnUNetSegmenter({**cfg, **extra}, 1, 3, ["background", "ring", "core"])
    stats = seg.train_continue(parts["real"], parts["synthetic"], parts["validation"], root / "real", root / name,
                               seed=0)
    return seg, stats


def fold0(root, name: str) -> Path:
    return (root / name / "nnunet/nnUNet_results/Dataset501_segsynth"
            / "nnUNetTrainerSegsynthShortContinue__nnUNetPlans__2d" / "fold_0")


def test_nnunet_continue_starts_from_the_real_only_weights_on_paired_batches(nnunet_real, monkeypatch):
    from segsynth.segmenters.nnunet import NnUNetSegmenter, trainer_class

    root, cfg, parts = nnunet_real
    real = NnUNetSegmenter.load(root / "real")._model["checkpoint"]["network_weights"]
    zero, stats = continue_nnunet(root, cfg, parts, "zero", continue_epochs=0)
    assert stats["epochs"] == 0
    assert_same(zero._model["checkpoint"]["network_weights"], real)

    cls = trainer_class("short", continuation=True)
    seen = []
    original = cls.train_step

    def spy(self, batch):
        seen.append({"keys": list(batch["keys"]), "weights": weights_of(self.network) if not seen else None,
                     "stream": self.configuration_manager.batch_size})
        return original(self, batch)

    mixed = []
    original_cutmix = cls.cutmix

    def cutmix_spy(batch):
        mixed.append(list(batch["keys"]))
        return original_cutmix(batch)

    monkeypatch.setattr(cls, "train_step", spy)
    monkeypatch.setattr(cls, "cutmix", staticmethod(cutmix_spy))
    seg, stats = continue_nnunet(root, cfg, parts, "one", continue_epochs=1, cutmix_p=1.0)
    assert len(seen) == stats["iterations_per_epoch"] == 2
    assert mixed == [record["keys"] for record in seen]  # p = 1: every training batch is cut-mixed
    assert_same(seen[0]["weights"], real)  # the first step starts from the real-only network, heads included
    for record in seen:
        keys, stream = record["keys"], record["stream"]
        assert len(keys) == 2 * stream
        assert all(re.fullmatch(r"real_\d{5}", k) for k in keys[:stream])  # real training cases, no validation case
        assert all(k.startswith("synth_") for k in keys[stream:])
    splits = json.loads((root / "one/nnunet/nnUNet_preprocessed/Dataset501_segsynth/splits_final.json").read_text())
    assert len(splits) == 1 and set(splits[0]["val"]) == {"real_val_00000", "real_val_00001"}
    assert not set(splits[0]["val"]) & set(splits[0]["train"])
    # the model is nnU-Net's checkpoint_best, and the continuation used the real-only model's plans
    best = torch.load(fold0(root, "one") / "checkpoint_best.pth", weights_only=False)["network_weights"]
    assert_same(seg._model["checkpoint"]["network_weights"], best)
    real_plans = NnUNetSegmenter.load(root / "real")._model["plans"]
    assert seg._model["plans"]["configurations"] == real_plans["configurations"]
    assert stats["model_checkpoint"] == "checkpoint_best.pth" and stats["n_synthetic_cases"] == 6


def test_nnunet_cutmix_keeps_targets_and_deep_supervision_consistent():
    import torch.nn.functional as F

    from segsynth.segmenters.nnunet import trainer_class

    cls = trainer_class("short", continuation=True)
    generator = torch.Generator().manual_seed(0)
    data = torch.rand((4, 1, 32, 32), generator=generator)
    full = torch.randint(0, 3, (4, 1, 32, 32), generator=generator, dtype=torch.int16)
    targets = [full.clone()] + [F.interpolate(full.float(), size=(s, s), mode="nearest-exact").to(full.dtype)
                                for s in (16, 8)]
    batch = {"data": data.clone(), "target": [t.clone() for t in targets], "keys": ["r0", "r1", "s0", "s1"]}
    np.random.seed(3)
    mixed = cls.cutmix(batch)
    changed = (mixed["data"] != data).any(dim=(0, 1))
    rows, cols = torch.nonzero(changed, as_tuple=True)
    inside = torch.zeros((32, 32), dtype=torch.bool)
    inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    for i in range(4):
        partner = (i + 2) % 4
        assert torch.equal(mixed["data"][i][:, inside], data[partner][:, inside])
        assert torch.equal(mixed["target"][0][i][:, inside], full[partner][:, inside])
        assert torch.equal(mixed["target"][0][i][:, ~inside], full[i][:, ~inside])
    for level, size in ((1, 16), (2, 8)):
        expected = F.interpolate(mixed["target"][0].float(), size=(size, size), mode="nearest-exact").to(full.dtype)
        assert torch.equal(mixed["target"][level], expected)


def test_nnunet_best_checkpoint_only_at_validation_epochs_and_resume(nnunet_real, monkeypatch):
    from segsynth.segmenters.nnunet import trainer_class

    root, cfg, parts = nnunet_real
    cls = trainer_class("short", continuation=True)
    base_save = trainer_class("short").save_checkpoint
    saved = []

    class Killed(Exception):
        pass

    def recording_save(self, filename):
        base_save(self, filename)
        saved.append((int(self.current_epoch), Path(filename).name))
        if kill_at is not None and Path(filename).name == "checkpoint_latest.pth" and self.current_epoch == kill_at:
            raise Killed()

    monkeypatch.setattr(trainer_class("short"), "save_checkpoint", recording_save)
    kill_at = None
    _, stats = continue_nnunet(root, cfg, parts, "every2", continue_epochs=3, val_every=2)
    best_epochs = [epoch for epoch, name in saved if name == "checkpoint_best.pth"]
    assert 1 in best_epochs and set(best_epochs) <= {1, 2}  # epochs 0, 1, 2: validation at 2 and the last
    assert stats["val_every"] == 2 and (fold0(root, "every2") / "checkpoint_best.pth").exists()

    # killed after the checkpoint of epoch 1: the resumed run loads it (not the real-only weights) and finishes
    saved.clear()
    kill_at = 1
    with pytest.raises(Killed):
        continue_nnunet(root, cfg, parts, "killed", continue_epochs=3, checkpoint_every=1)
    kill_at = None
    seg, stats = continue_nnunet(root, cfg, parts, "killed", continue_epochs=3, checkpoint_every=1)
    assert stats["resumed_from_epoch"] == 2 and stats["epochs"] == 3 and stats["prepare_seconds"] == 0.0
    assert not (fold0(root, "killed") / "checkpoint_latest.pth").exists()
    best = torch.load(fold0(root, "killed") / "checkpoint_best.pth", weights_only=False)["network_weights"]
    assert_same(seg._model["checkpoint"]["network_weights"], best)
