"""Scoring segmenters: Dice, IoU, average surface distance and HD95 per case and class, and mask adherence.

Two conventions, told apart by the ``unit`` column of the evaluation table:

* ``slice·px`` (every dataset): each 2D test slice is scored on its own, distances in pixels;
* ``volume·mm`` (datasets whose index carries ``volume_id`` and the spacings, i.e. NIfTI volumes): the test
  slices of each volume are restacked by ``slice_index`` into a (Z, H, W) volume and scored as one 3D volume,
  distances in mm at the (z, y, x) spacing of the written grid — the convention of the ACDC and Synapse
  papers. Slice positions missing from the dataset (slices dropped by ``empty_slices: drop``) are background
  in both prediction and truth, so the volume keeps its geometry but false positives on the dropped slices
  are not seen; build the dataset with ``empty_slices: keep`` to score whole volumes.

Empty-structure policy (per scored slice or volume and foreground class; the usual convention of segmentation
challenges, so that scores stay finite and comparable):

* class absent from both ground truth and prediction: Dice, ASD and HD95 are NaN — there is nothing
  to segment, so the pair is excluded from every (nan-)mean rather than counted as perfect;
* class present in only one of them: Dice and IoU are 0 and ASD and HD95 are the diagonal (the image's in
  pixels, the stacked volume's in mm), the worst distance possible, instead of MONAI's inf/NaN, which would
  poison every mean;
* present in both: MONAI's values (Dice; IoU; symmetric ASD; HD95 at the 95th percentile).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance, compute_iou

from .data.canonical import SLICE_PX, SPACING_COLUMNS, VOLUME_COLUMNS, VOLUME_MM
from .errors import InputDataError
from .io import write_parquet
from .segmenters import Segmenter, load_segmenter, load_synthetic_set
from .training import set_torch_threads

METRICS = ("dice", "iou", "asd", "hd95")
#: Samples scored at once; bounds the memory of the one-hot tensors.
CHUNK = 64


def evaluate_segmenter(model_dir, data_dir, out_path, split: str = "test", threads: int = 1) -> pd.DataFrame:
    """Score a trained segmenter on one split of a canonical dataset and write the long table.

    Columns: sample_id, case_id, class_index, class_name, metric ("dice" | "iou" | "asd" | "hd95"), value,
    unit. Always one row per sample, foreground class and metric with unit ``slice·px``; where the dataset
    knows its volumes and their spacing (:func:`has_volumes`), also one row per volume, foreground class and
    metric with unit ``volume·mm`` and the volume's id as sample_id (:func:`volume_scores`). The volume rows
    are added rather than replacing the slice rows: the per-slice scores stay comparable across every dataset
    and with the 2D papers, and the tables pick the volume rows where they exist (``segsynth.tables``). See the
    module docstring for empty classes. The surface distances (MONAI's, on the CPU) run in ``threads``
    processes: inside a GPU job the GPU waits for them.
    """
    from .data.canonical import load_split, read_meta

    set_torch_threads(1)
    segmenter = load_segmenter(model_dir)
    class_names = read_meta(data_dir)["class_names"]
    if list(class_names) != segmenter.class_names:
        raise InputDataError(Path(data_dir) / "meta.json",
                             f"classes {class_names} differ from the model's {segmenter.class_names}")
    data = load_split(data_dir, split)
    predicted = predict_labels(segmenter, data.images)
    scores = {"dice": dice_scores(predicted, data.masks, len(class_names)),
              "iou": iou_scores(predicted, data.masks, len(class_names)),
              **distance_scores(predicted, data.masks, len(class_names), workers=threads)}
    frames = [_long_scores(data.index, class_names, metric, scores[metric]).assign(unit=SLICE_PX)
              for metric in METRICS]
    if has_volumes(data.index):
        volumes, volume_values = volume_scores(predicted, data.masks, data.index, len(class_names), workers=threads)
        frames += [_long_scores(volumes, class_names, metric, volume_values[metric]).assign(unit=VOLUME_MM)
                   for metric in METRICS]
    frame = pd.concat(frames, ignore_index=True)
    write_parquet(out_path, frame)
    return frame


def score_synthetic(model_dir, synthetic_dir, out_path=None, judge_dir=None) -> pd.DataFrame:
    """Mask adherence: Dice of real-only segmenters on synthetic images against their conditioning masks.

    A generator that follows its masks yields images a real-only model segments as the mask says. The model
    at ``model_dir`` is f_θ (scorer ``value_model``); the one at ``judge_dir``, when given, is the adherence
    judge (scorer ``judge``): a real-only model that guided nothing, so a guided sampler's push toward f_θ's
    errors does not lower its score the way it lowers f_θ's. Columns: scorer, sample_id, class (a foreground
    class name, or "mean" for the sample's nan-mean over its foreground classes), dice. Written to
    ``out_path`` when given.
    """
    set_torch_threads(1)
    synthetic = load_synthetic_set(synthetic_dir)
    scorers = {"value_model": model_dir} if judge_dir is None else {"value_model": model_dir, "judge": judge_dir}
    frames = []
    for scorer, directory in scorers.items():
        segmenter = load_segmenter(directory)
        if synthetic.masks.size and int(synthetic.masks.max()) >= segmenter.num_classes:
            raise InputDataError(Path(synthetic_dir) / "masks.npy", f"class index {int(synthetic.masks.max())} "
                                 f"beyond the {directory} model's {segmenter.num_classes}")
        dice = dice_scores(predict_labels(segmenter, synthetic.images), synthetic.masks, segmenter.num_classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a sample without foreground has a NaN mean
            per_sample = np.nanmean(dice, axis=1)
        columns = {name: dice[:, k] for k, name in enumerate(segmenter.class_names[1:])}
        wide = pd.DataFrame({"sample_id": synthetic.records["sample_id"].to_numpy(), **columns, "mean": per_sample})
        frames.append(wide.melt(id_vars="sample_id", var_name="class", value_name="dice").assign(scorer=scorer))
    frame = pd.concat(frames, ignore_index=True)[["scorer", "sample_id", "class", "dice"]]
    if out_path is not None:
        write_parquet(out_path, frame)
    return frame


def profile_segmenter(model_dir, data_dir, out_path) -> dict:
    """Size and compute of a trained segmenter at the dataset's resolution, for the segmenter table.

    ``params`` counts every parameter of the network the segmenter evaluates with (its value model:
    the network with its own preprocessing); ``macs`` is half the floating-point operations of one
    forward pass of a single image, counted by torch's ``FlopCounterMode`` (convolutions, matmuls and
    attention; elementwise operations are not counted, as in the usual MACs tables).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .data.canonical import read_meta
    from .io import write_json

    set_torch_threads(1)
    segmenter = load_segmenter(model_dir)
    meta = read_meta(data_dir)
    network = segmenter.as_value_model()
    # on the network's device: a segmenter loads onto the GPU when the job sees one
    image = torch.zeros(1, meta["channels"], *meta["resolution"], device=next(network.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network(image)
    profile = {"kind": segmenter.kind, "params": int(sum(p.numel() for p in network.parameters())),
               "macs": int(counter.get_total_flops() // 2), "resolution": list(meta["resolution"])}
    write_json(out_path, profile)
    return profile


def predict_labels(segmenter: Segmenter, images: np.ndarray) -> np.ndarray:
    """Arg-max labels (N,H,W) uint8, predicted chunk-wise so the (N,K,H,W) probabilities never coexist."""
    labels = np.empty((len(images), *images.shape[2:]), dtype=np.uint8)
    for start in range(0, len(images), CHUNK):
        labels[start:start + CHUNK] = segmenter.predict_proba(images[start:start + CHUNK]).argmax(axis=1)
    return labels


def dice_scores(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice per sample and foreground class, (N, K-1), under the module's empty-structure policy."""
    return _overlap_scores(compute_dice, predicted, truth, num_classes)


def iou_scores(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """IoU (Jaccard) per sample and foreground class, (N, K-1), under the module's empty-structure policy; its
    mean over classes is the mIoU ORDER and LEAF report."""
    return _overlap_scores(compute_iou, predicted, truth, num_classes)


def _overlap_scores(metric, predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.empty((len(truth), num_classes - 1))
    for rows, pred_hot, true_hot in _one_hot_chunks(predicted, truth, num_classes):
        with _quiet_monai():
            values = metric(pred_hot, true_hot, include_background=False, ignore_empty=True)
        out[rows] = _apply_policy(values.numpy(), pred_hot, true_hot, absent_in_one=0.0)
    return out


def distance_scores(predicted: np.ndarray, truth: np.ndarray, num_classes: int,
                    workers: int = 1) -> dict[str, np.ndarray]:
    """Symmetric ASD and HD95 in pixels per sample and foreground class, (N, K-1) each, under the policy.

    Chunks of ``CHUNK`` samples are scored in ``workers`` forked processes (the same numbers as one process:
    each chunk's computation is independent and the results are put back in order)."""
    out = {"asd": np.empty((len(truth), num_classes - 1)), "hd95": np.empty((len(truth), num_classes - 1))}
    chunks = [slice(start, start + CHUNK) for start in range(0, len(truth), CHUNK)]
    jobs = [(predicted[rows], truth[rows], num_classes) for rows in chunks]
    for rows, (asd, hd95) in zip(chunks, _run_jobs(_distance_chunk, jobs, workers)):
        out["asd"][rows], out["hd95"][rows] = asd, hd95
    return out


def _run_jobs(function, jobs: list[tuple], workers: int) -> list:
    """``function(*job)`` for every job, in order; in ``workers`` forked processes when more than one."""
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("fork")  # the children only compute on the CPU
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            return list(pool.map(function, *zip(*jobs)))
    return [function(*job) for job in jobs]


def has_volumes(index: pd.DataFrame) -> bool:
    """Whether every row of ``index`` names its volume and a finite spacing, so the split can be scored per
    volume in mm. All or nothing: a split scored partly per volume would mix two conventions in one mean."""
    if len(index) == 0 or any(column not in index.columns for column in VOLUME_COLUMNS):
        return False
    spacing = index[list(SPACING_COLUMNS)].to_numpy(dtype=np.float64)
    return bool(index["volume_id"].notna().all() and np.isfinite(spacing).all())


def stack_volume(slices: np.ndarray, slice_index) -> np.ndarray:
    """(n, H, W) slices of one volume → (Z, H, W) with slice i at ``slice_index[i] - min(slice_index)``;
    positions no slice fills (slices not in the dataset) are background (0)."""
    z = np.asarray(slice_index, dtype=np.int64)
    z = z - z.min()
    volume = np.zeros((int(z.max()) + 1, *slices.shape[1:]), dtype=slices.dtype)
    volume[z] = slices
    return volume


def volume_scores(predicted: np.ndarray, truth: np.ndarray, index: pd.DataFrame, num_classes: int,
                  workers: int = 1) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Dice, IoU, symmetric ASD and HD95 per volume and foreground class, distances in mm.

    ``predicted`` and ``truth`` (N, H, W) align with ``index`` rows, which need ``volume_id``, ``slice_index``
    and the spacings (:func:`has_volumes`). Each volume's slices are restacked by slice index
    (:func:`stack_volume`) and scored by MONAI on the (1, 2, Z, H, W) one-hot of each class, distances at
    spacing (z, y, x), under the module's empty-structure policy (the worst distance is the stacked volume's
    diagonal in mm). Returns the volumes (sample_id: the volume id, case_id), in order of first appearance, and
    per metric a (V, K-1) array. Volumes are scored in ``workers`` forked processes.
    """
    names, cases, jobs = [], [], []
    for name, rows in index.groupby("volume_id", sort=False):
        source = rows["source_file"].iloc[0]
        if rows["slice_index"].duplicated().any():
            raise InputDataError(source, f"volume {name!r} holds a slice_index twice; cannot restack it")
        spacing = rows[list(SPACING_COLUMNS)].drop_duplicates()
        if len(spacing) != 1:
            raise InputDataError(source, f"the slices of volume {name!r} disagree on the spacing (z, y, x)")
        if rows["case_id"].nunique() != 1:
            raise InputDataError(source, f"volume {name!r} spans several cases")
        positions = rows.index.to_numpy()
        z = rows["slice_index"].to_numpy()
        names.append(name)
        cases.append(rows["case_id"].iloc[0])
        jobs.append((stack_volume(predicted[positions], z), stack_volume(truth[positions], z),
                     tuple(float(v) for v in spacing.iloc[0]), num_classes))
    results = _run_jobs(_volume_job, jobs, workers)
    scores = {metric: np.array([result[m] for result in results]).reshape(len(jobs), num_classes - 1)
              for m, metric in enumerate(METRICS)}
    return pd.DataFrame({"sample_id": names, "case_id": cases}), scores


def _volume_job(predicted: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float],
                num_classes: int) -> np.ndarray:
    """(len(METRICS), K-1) scores of one (Z, H, W) volume, in the order of METRICS, under the module's policy."""
    worst = math.hypot(*(size * step for size, step in zip(truth.shape, spacing)))
    out = np.empty((len(METRICS), num_classes - 1))
    for k in range(1, num_classes):
        pred_hot, true_hot = _binary_hot(predicted == k), _binary_hot(truth == k)
        values = dict.fromkeys(METRICS, np.full((1, 1), np.nan))
        with _quiet_monai():
            values["dice"] = compute_dice(pred_hot, true_hot, include_background=False, ignore_empty=True).numpy()
            values["iou"] = compute_iou(pred_hot, true_hot, include_background=False, ignore_empty=True).numpy()
            if pred_hot[:, 1].any() and true_hot[:, 1].any():  # else the policy decides: spare the distances
                values["asd"] = compute_average_surface_distance(
                    pred_hot, true_hot, include_background=False, symmetric=True, spacing=spacing).numpy()
                values["hd95"] = compute_hausdorff_distance(
                    pred_hot, true_hot, include_background=False, percentile=95, spacing=spacing).numpy()
        for m, metric in enumerate(METRICS):
            absent_in_one = 0.0 if metric in ("dice", "iou") else worst
            out[m, k - 1] = _apply_policy(values[metric], pred_hot, true_hot, absent_in_one)[0, 0]
    return out


def _binary_hot(mask: np.ndarray) -> torch.Tensor:
    """A boolean (Z, H, W) mask as MONAI's (1, 2, Z, H, W) one-hot: channel 0 background, channel 1 the class."""
    mask = torch.from_numpy(np.ascontiguousarray(mask))
    return torch.stack([~mask, mask])[None].float()


def _distance_chunk(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(ASD, HD95) of one chunk of samples, (n, K-1) each, under the module's policy."""
    worst = math.hypot(*truth.shape[1:])
    pred_hot, true_hot = _one_hot(predicted, num_classes), _one_hot(truth, num_classes)
    with _quiet_monai():
        asd = compute_average_surface_distance(pred_hot, true_hot, include_background=False, symmetric=True)
        hd95 = compute_hausdorff_distance(pred_hot, true_hot, include_background=False, percentile=95)
    return (_apply_policy(asd.numpy(), pred_hot, true_hot, absent_in_one=worst),
            _apply_policy(hd95.numpy(), pred_hot, true_hot, absent_in_one=worst))


def _one_hot_chunks(predicted: np.ndarray, truth: np.ndarray,
                    num_classes: int) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(rows, one-hot prediction, one-hot truth) for ``CHUNK`` samples at a time, in MONAI's (B,K,H,W) layout."""
    for start in range(0, len(truth), CHUNK):
        rows = slice(start, start + CHUNK)
        yield rows, _one_hot(predicted[rows], num_classes), _one_hot(truth[rows], num_classes)


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    labels = torch.from_numpy(labels.astype(np.int64))
    return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def _apply_policy(values: np.ndarray, pred_hot: torch.Tensor, true_hot: torch.Tensor,
                  absent_in_one: float) -> np.ndarray:
    """Replace MONAI's values where a foreground class is missing from the prediction and/or the truth."""
    in_pred = pred_hot[:, 1:].flatten(2).any(dim=2).numpy()
    in_true = true_hot[:, 1:].flatten(2).any(dim=2).numpy()
    values = np.where(in_pred & in_true, values.astype(np.float64), absent_in_one)
    return np.where(in_pred | in_true, values, np.nan)


@contextlib.contextmanager
def _quiet_monai():
    """Hide MONAI's warnings about its own deprecated internals and about the empty classes we handle."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"monai\.")
        warnings.filterwarnings("ignore", message=r"the (ground truth|prediction) of class \d+ is all 0")
        yield


def _long_scores(index: pd.DataFrame, class_names: list[str], metric: str, values: np.ndarray) -> pd.DataFrame:
    """(N, K-1) scores of one metric → rows of sample_id, case_id, class_index, class_name, metric, value.

    ``index`` has a sample_id and case_id per row of ``values`` (samples, or volumes as :func:`volume_scores`
    lists them)."""
    n, k = values.shape
    return pd.DataFrame({
        "sample_id": np.repeat(index["sample_id"].to_numpy(), k),
        "case_id": np.repeat(index["case_id"].to_numpy(), k),
        "class_index": np.tile(np.arange(1, k + 1), n),
        "class_name": np.tile(np.asarray(class_names[1:], dtype=object), n),
        "metric": metric,
        "value": values.reshape(-1),
    })
