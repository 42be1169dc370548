"""Dice / ASD / HD95 on hand-computed cases, the empty-structure policy, and the evaluation entry points."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from segsynth import evaluation
from segsynth.data import canonical
from segsynth.evaluation import (dice_scores, distance_scores, evaluate_segmenter, score_synthetic, stack_volume,
                                  volume_scores)
from segsynth.segmenters import load_segmenter, train_segmenter

CLASS_NAMES = ["background", "a", "b"]
SIZE = 16
DIAGONAL = math.hypot(SIZE, SIZE)


def square(top: int, left: int, side: int = 4, label: int = 1) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[top:top + side, left:left + side] = label
    return mask


def scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    return {"dice": dice_scores(predicted[None], truth[None], 3)[0],
            **{k: v[0] for k, v in distance_scores(predicted[None], truth[None], 3).items()}}


def test_identical_masks_score_perfectly():
    mask = square(2, 2) + square(9, 9, label=2)
    result = scores(mask, mask)
    np.testing.assert_array_equal(result["dice"], [1.0, 1.0])
    np.testing.assert_array_equal(result["asd"], [0.0, 0.0])
    np.testing.assert_array_equal(result["hd95"], [0.0, 0.0])


def test_square_shifted_by_one_pixel():
    # 4x4 squares overlapping in 4x3 pixels: Dice 2*12/32. Of the 12 boundary pixels of each square,
    # 6 lie on the other's boundary (distance 0) and 6 one pixel away: ASD 0.5, HD95 1.
    result = scores(square(2, 3), square(2, 2))
    assert result["dice"][0] == pytest.approx(0.75)
    assert result["asd"][0] == pytest.approx(0.5)
    assert result["hd95"][0] == pytest.approx(1.0)


def test_empty_structure_policy():
    truth = square(2, 2)  # class 1 present, class 2 absent
    missed = np.zeros_like(truth)
    result = scores(missed, truth)  # class 1 missed; class 2 absent in both
    assert result["dice"][0] == 0.0 and result["asd"][0] == DIAGONAL and result["hd95"][0] == DIAGONAL
    assert np.isnan(result["dice"][1]) and np.isnan(result["asd"][1]) and np.isnan(result["hd95"][1])

    hallucinated = truth + square(10, 10, label=2)  # class 2 predicted but absent from the truth
    result = scores(hallucinated, truth)
    assert result["dice"].tolist() == [1.0, 0.0]
    assert result["asd"].tolist() == [0.0, DIAGONAL] and result["hd95"].tolist() == [0.0, DIAGONAL]


def test_scores_are_chunked_consistently(monkeypatch):
    rng = np.random.default_rng(0)
    truth = np.stack([square(*rng.integers(0, 12, 2)) for _ in range(7)])
    predicted = np.stack([square(*rng.integers(0, 12, 2)) for _ in range(7)])
    whole = distance_scores(predicted, truth, 3)
    monkeypatch.setattr(evaluation, "CHUNK", 3)
    np.testing.assert_array_equal(distance_scores(predicted, truth, 3)["asd"], whole["asd"])
    # the same numbers from worker processes (a GPU job's threads score its chunks in parallel)
    parallel = distance_scores(predicted, truth, 3, workers=2)
    for metric in ("asd", "hd95"):
        np.testing.assert_array_equal(parallel[metric], whole[metric])


class Oracle:
    """Stands in for a trained model: predicts the masks it was given (one-hot probabilities)."""

    class_names = CLASS_NAMES
    num_classes = 3

    def __init__(self, masks: np.ndarray):
        self.masks = masks

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        rows = [self._row(image) for image in images]
        return np.eye(3, dtype=np.float32)[self.masks[rows]].transpose(0, 3, 1, 2)

    def _row(self, image: np.ndarray) -> int:
        return int(round(float(image[0, 0, 0]) * 100))  # each image carries its row number


def write_dataset(directory) -> np.ndarray:
    """Four test samples (two cases): class 2 exists only in the first sample."""
    masks = np.stack([square(2, 2) + square(9, 9, label=2), square(3, 3), square(1, 5), square(6, 6)])
    images = np.zeros((4, 1, SIZE, SIZE), dtype=np.float32)
    images[:, 0, 0, 0] = np.arange(4) / 100
    index = pd.DataFrame({"sample_id": ["t0", "t1", "t2", "t3"], "case_id": ["c0", "c0", "c1", "c1"],
                          "split": "test", "source_file": "x.nii.gz", "slice_index": [0, 1, 0, 1]})
    directory.mkdir(parents=True)
    np.save(directory / "images.npy", images)
    np.save(directory / "masks.npy", masks)
    index.to_parquet(directory / "index.parquet", index=False)
    (directory / "meta.json").write_text(json.dumps({
        "dataset": "toy", "kind": "toy", "class_names": CLASS_NAMES, "channels": 1, "resolution": [SIZE, SIZE],
        "format_version": canonical.FORMAT_VERSION, "n_train": 0, "n_test": 4}))
    return masks


def test_evaluate_segmenter_writes_long_table(tmp_path, monkeypatch):
    masks = write_dataset(tmp_path / "data")
    monkeypatch.setattr(evaluation, "load_segmenter", lambda model_dir: Oracle(masks))
    out = tmp_path / "metrics.parquet"
    frame = evaluate_segmenter("model", tmp_path / "data", out)

    assert list(frame.columns) == ["sample_id", "case_id", "class_index", "class_name", "metric", "value", "unit"]
    pd.testing.assert_frame_equal(pd.read_parquet(out), frame, check_dtype=False)
    assert len(frame) == 4 * 2 * 4 and (frame["unit"] == "slice·px").all()  # no volumes: per slice only
    row = frame.set_index(["sample_id", "class_name", "metric"])["value"]
    assert row[("t0", "b", "dice")] == 1.0 and row[("t0", "b", "hd95")] == 0.0
    assert np.isnan(row[("t1", "b", "dice")]) and np.isnan(row[("t3", "b", "asd")])
    class_a = frame[frame["class_name"] == "a"].groupby("metric")["value"]
    assert class_a.min().to_dict() == class_a.max().to_dict() == {"asd": 0.0, "dice": 1.0, "hd95": 0.0,
                                                                   "iou": 1.0}
    assert frame.loc[frame["sample_id"] == "t2", "case_id"].eq("c1").all()


def test_score_synthetic_reports_per_class_and_mean(tmp_path, monkeypatch):
    conditioning = np.stack([square(2, 2) + square(9, 9, label=2), square(3, 3)])
    predicted = np.stack([square(2, 2), square(3, 3)])  # misses class 2 in the first sample
    images = np.zeros((2, 1, SIZE, SIZE), dtype=np.float32)
    images[:, 0, 0, 0] = [0.0, 0.01]
    syn = tmp_path / "syn"
    syn.mkdir()
    np.save(syn / "images.npy", images)
    np.save(syn / "masks.npy", conditioning)
    pd.DataFrame({"sample_id": ["g0", "g1"], "source_sample_id": ["t0", "t1"]}).to_parquet(syn / "records.parquet")
    monkeypatch.setattr(evaluation, "load_segmenter", lambda model_dir: Oracle(predicted))

    frame = score_synthetic("model", syn, tmp_path / "adherence.parquet")
    dice = frame.set_index(["sample_id", "class"])["dice"]
    assert dice[("g0", "a")] == 1.0 and dice[("g0", "b")] == 0.0 and dice[("g0", "mean")] == 0.5
    assert np.isnan(dice[("g1", "b")]) and dice[("g1", "mean")] == 1.0
    assert (tmp_path / "adherence.parquet").exists()
    assert set(frame["scorer"]) == {"value_model"}

    # the adherence judge: a second model scores the same set, its rows kept apart from f_θ's
    judged = np.stack([square(2, 2) + square(9, 9, label=2), np.zeros((SIZE, SIZE), dtype=np.uint8)])
    monkeypatch.setattr(evaluation, "load_segmenter",
                        lambda model_dir: Oracle(judged if model_dir == "judge" else predicted))
    frame = score_synthetic("model", syn, judge_dir="judge")
    means = frame[frame["class"] == "mean"].set_index(["scorer", "sample_id"])["dice"]
    assert means[("value_model", "g0")] == 0.5 and means[("judge", "g0")] == 1.0
    assert means[("value_model", "g1")] == 1.0 and means[("judge", "g1")] == 0.0


def test_evaluate_trained_model_end_to_end(tmp_path):
    masks = write_dataset(tmp_path / "data")
    # the loader needs a train split: append training copies of the test samples
    data = tmp_path / "data"
    index = pd.read_parquet(data / "index.parquet")
    train = index.assign(sample_id="r" + index["sample_id"], case_id="r" + index["case_id"], split="train")
    pd.concat([index, train]).to_parquet(data / "index.parquet", index=False)
    np.save(data / "images.npy", np.concatenate([np.load(data / "images.npy")] * 2))
    np.save(data / "masks.npy", np.concatenate([masks, masks]))
    cfg = {"kind": "monai_unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "steps": 2,
           "batch_size": 2, "lr": 1e-3, "weight_decay": 0.0, "checkpoint_every": 0, "augment": False}
    train_segmenter(cfg, data, tmp_path / "model", seed=0)

    frame = evaluate_segmenter(tmp_path / "model", data, tmp_path / "metrics.parquet")
    assert len(frame) == 4 * 2 * 4 and set(frame["metric"]) == {"dice", "iou", "asd", "hd95"}
    values = frame["value"].dropna()
    assert values.between(0.0, DIAGONAL).all()


def test_profile_and_segmenter_table(tmp_path):
    from conftest import make_tiny_dataset
    from segsynth.evaluation import profile_segmenter
    from segsynth.tables import write_segmenter_tables

    data = make_tiny_dataset(tmp_path / "data")
    cfg = {"kind": "monai_unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "steps": 2,
           "batch_size": 2, "lr": 1e-3, "weight_decay": 0.0, "checkpoint_every": 0, "augment": False}
    train_segmenter(cfg, data, tmp_path / "model", seed=0)
    profile = profile_segmenter(tmp_path / "model", data, tmp_path / "profile.json")
    network = load_segmenter(tmp_path / "model").network
    assert profile["params"] == sum(p.numel() for p in network.parameters()) > 0
    # The first convolution alone (1 → 4 channels, 3×3, stride 2 on 16²: 8² outputs) is 4·9·64 MACs.
    assert profile["macs"] > 4 * 9 * 64 and profile["kind"] == "monai_unet"

    evaluate_segmenter(tmp_path / "model", data, tmp_path / "metrics.parquet")
    (tmp_path / "bench.tsv").write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t300\n")
    rows = pd.DataFrame([{"dataset": "tiny", "segmenter": "unet", "eval": tmp_path / "metrics.parquet",
                          "profile": tmp_path / "profile.json", "benchmark": tmp_path / "bench.tsv"}])
    table = write_segmenter_tables(rows, tmp_path / "seg.parquet", tmp_path / "seg.md")
    assert list(table["params"]) == [profile["params"]] and list(table["train_s"]) == [12.5]
    assert 0 <= table["dice_mean"].iloc[0] <= 1 and table["hd95_std"].notna().all()
    assert "| tiny | unet | monai_unet |" in (tmp_path / "seg.md").read_text()


def test_iou_is_dice_over_two_minus_dice_under_the_same_policy():
    """IoU = D / (2 − D) per sample and class; 0 where a class is in one of truth and prediction only, NaN
    where in neither."""
    truth = np.stack([square(2, 2) + square(9, 9, label=2), square(3, 3), square(3, 3)])
    predicted = np.stack([square(3, 3) + square(9, 9, label=2), square(3, 3, label=2), np.zeros((SIZE, SIZE))])
    predicted = predicted.astype(truth.dtype)
    dice = evaluation.dice_scores(predicted, truth, 3)
    iou = evaluation.iou_scores(predicted, truth, 3)
    both = ~np.isnan(dice)
    np.testing.assert_allclose(iou[both], dice[both] / (2 - dice[both]), atol=1e-6)
    assert np.array_equal(np.isnan(iou), np.isnan(dice))
    assert 0 < iou[0, 0] < 1 and iou[1, 0] == 0.0 and iou[2, 0] == 0.0


# --- per volume, in mm -----------------------------------------------------------------------------------

SPACING = {"spacing_z": 5.0, "spacing_y": 1.0, "spacing_x": 2.0}  # mm, anisotropic on every axis


def box(z: slice, y: slice, x: slice, shape=(6, SIZE, SIZE)) -> np.ndarray:
    volume = np.zeros(shape, dtype=np.uint8)
    volume[z, y, x] = 1
    return volume


def test_volume_hd95_and_asd_in_mm_by_hand():
    """Truth: a box 2 slices thick (z 1–2, y 2–5, x 2–5), so every voxel is a surface voxel; prediction: the
    same box shifted by one voxel on each axis (z 2–3, y 3–6, x 3–6).

    Each predicted voxel's nearest truth voxel is the per-axis clamp, at dz ∈ {0, 5}, dy ∈ {0, 1}, dx ∈ {0, 2} mm.
    Per predicted slice the 16 voxels have (dy, dx) = (0, 0) ×9, (1, 0) ×3, (0, 2) ×3, (1, 2) ×1, so the 32
    distances sorted are 0 ×9, 1 ×3, 2 ×3, √5, 5 ×9, √26 ×3, √29 ×3, √30; truth → prediction is the mirror
    image, the same 32. HD95 (linear 95th percentile, position 0.95 · 31 = 29.45, between two √29): √29 mm;
    ASD: their mean. Dice over the volume: overlap z 2, y 3–5, x 3–5 = 9 voxels of 32 + 32."""
    truth = box(slice(1, 3), slice(2, 6), slice(2, 6))
    predicted = box(slice(2, 4), slice(3, 7), slice(3, 7))
    distances = [0] * 9 + [1] * 3 + [2] * 3 + [math.sqrt(5)] + [5] * 9 + [math.sqrt(26)] * 3 + \
        [math.sqrt(29)] * 3 + [math.sqrt(30)]
    index = pd.DataFrame({"volume_id": "v", "case_id": "c", "source_file": "v.nii.gz", "slice_index": range(6),
                          **SPACING})
    volumes, values = volume_scores(predicted, truth, index, 2)
    assert volumes.to_dict("list") == {"sample_id": ["v"], "case_id": ["c"]}
    assert values["hd95"][0, 0] == pytest.approx(math.sqrt(29), rel=1e-6)
    assert values["asd"][0, 0] == pytest.approx(sum(distances) / 32, rel=1e-6)
    assert values["dice"][0, 0] == pytest.approx(2 * 9 / 64) and values["iou"][0, 0] == pytest.approx(9 / 55)


def test_stack_volume_puts_slices_at_their_index():
    slices = np.stack([np.full((2, 2), 3), np.full((2, 2), 1)]).astype(np.uint8)
    volume = stack_volume(slices, [7, 5])  # out of order, slice 6 missing
    assert volume.shape == (3, 2, 2)
    assert volume[:, 0, 0].tolist() == [1, 0, 3]


def write_volume_dataset(directory) -> tuple[np.ndarray, np.ndarray]:
    """Test rows of two volumes of case c0 (as ACDC's two frames), stored out of order, with absent slices:

    * v0, slices 1–3: the boxes of test_volume_hd95_and_asd_in_mm_by_hand (class a);
    * v1, slices 1 and 3 (slice 2 absent): a 4×4 square of class a at slice 1 in the truth, at slice 3 in the
      prediction, so 2 × 5 = 10 mm apart; class b only in the prediction (slice 1).
    Returns (truth masks, predicted masks) in row order."""
    v0_truth = box(slice(1, 3), slice(2, 6), slice(2, 6))
    v0_pred = box(slice(2, 4), slice(3, 7), slice(3, 7))
    rows = [("v0", z, v0_truth[z], v0_pred[z]) for z in (3, 1, 2)]
    rows += [("v1", 3, np.zeros((SIZE, SIZE), np.uint8), square(4, 4)),
             ("v1", 1, square(4, 4), square(10, 10, label=2))]
    truth, predicted = np.stack([r[2] for r in rows]), np.stack([r[3] for r in rows])
    images = np.zeros((len(rows), 1, SIZE, SIZE), dtype=np.float32)
    images[:, 0, 0, 0] = np.arange(len(rows)) / 100
    index = pd.DataFrame({"sample_id": [f"{v}_s{z:03d}" for v, z, *_ in rows], "case_id": "c0", "split": "test",
                          "source_file": [f"{v}.nii.gz" for v, *_ in rows], "slice_index": [z for _, z, *_ in rows],
                          "volume_id": [v for v, *_ in rows], **SPACING})
    directory.mkdir(parents=True)
    np.save(directory / "images.npy", images)
    np.save(directory / "masks.npy", truth)
    index.to_parquet(directory / "index.parquet", index=False)
    (directory / "meta.json").write_text(json.dumps({
        "dataset": "toy", "kind": "toy", "class_names": CLASS_NAMES, "channels": 1, "resolution": [SIZE, SIZE],
        "format_version": canonical.FORMAT_VERSION, "n_train": 0, "n_test": len(rows)}))
    return truth, predicted


def test_evaluate_segmenter_adds_per_volume_rows_in_mm(tmp_path, monkeypatch):
    truth, predicted = write_volume_dataset(tmp_path / "data")
    monkeypatch.setattr(evaluation, "load_segmenter", lambda model_dir: Oracle(predicted))
    frame = evaluate_segmenter("model", tmp_path / "data", tmp_path / "metrics.parquet", threads=2)

    slices, volumes = frame[frame["unit"] == "slice·px"], frame[frame["unit"] == "volume·mm"]
    assert len(slices) == 5 * 2 * 4 and len(volumes) == 2 * 2 * 4 and len(frame) == len(slices) + len(volumes)
    value = volumes.set_index(["sample_id", "class_name", "metric"])["value"]
    assert set(volumes["case_id"]) == {"c0"}
    assert value[("v0", "a", "hd95")] == pytest.approx(math.sqrt(29), rel=1e-6)
    assert value[("v0", "a", "dice")] == pytest.approx(18 / 64)
    assert np.isnan(value[("v0", "b", "dice")]) and np.isnan(value[("v0", "b", "hd95")])  # b in neither
    # v1: slice 2 is absent, yet the squares stay two slices (10 mm) apart
    assert value[("v1", "a", "hd95")] == pytest.approx(10.0) and value[("v1", "a", "asd")] == pytest.approx(10.0)
    assert value[("v1", "a", "dice")] == 0.0
    # b only predicted: the worst distance, the stacked volume's diagonal in mm (3 slices × 5, 16 × 1, 16 × 2)
    assert value[("v1", "b", "hd95")] == pytest.approx(math.hypot(3 * 5.0, SIZE * 1.0, SIZE * 2.0))
    assert value[("v1", "b", "dice")] == 0.0 and value[("v1", "b", "iou")] == 0.0
    # the slice rows are the per-slice scores as before, in pixels
    per_slice = slices.set_index(["sample_id", "class_name", "metric"])["value"]
    expected = distance_scores(predicted[2:3], truth[2:3], 3)["hd95"][0, 0]  # row 2 is v0's slice 2
    assert per_slice[("v0_s002", "a", "hd95")] == expected != pytest.approx(value[("v0", "a", "hd95")])
