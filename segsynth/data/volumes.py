"""Reading 3D volumes and 2D slice files, and turning them into the canonical 2D slices.

The papers' volumetric datasets (ACDC, Synapse, nnU-Net raw folders) reach segsynth in a few
layouts: NIfTI volumes, and the HDF5/NPZ slice or volume files of the common 2D pipelines (SSL4MIS
for ACDC, TransUNet for Synapse). This module holds what the adapters share: reading each file kind
with a clear error naming the file, intensity normalisation (CT windowing, MRI percentiles), the
empty-slice policy, and the square-pad-and-resize that every adapter applies to its slices (MONAI's
``Resize``: area averaging for images, nearest neighbour for labels, so no interpolated value can
become a class index).

A *case* is the unit of splitting (a patient, a CT scan); every slice keeps its case id, so
:func:`segsynth.data.splits.case_split` can never put slices of one case on both sides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segsynth.data.canonical import SPACING_COLUMNS, config_option
from segsynth.data.splits import case_split
from segsynth.errors import ConfigError, InputDataError

INTENSITY_MODES = ("window", "percentile", "none")
EMPTY_SLICE_POLICIES = ("keep", "drop")


@dataclass
class Volume:
    """Slices of one source volume (or one slice file) before resizing.

    ``images`` (S, C, H, W) are normalised to [0, 1], ``labels`` (S, H, W) are class indices.
    ``case_id`` is the unit of splitting (a patient); ``volume_id`` names this volume within it
    (e.g. ``patient001_frame01``: ACDC has two annotated frames per patient), and sample ids are
    ``<volume_id>_s<slice>``. ``spacing`` is the (z, y, x) voxel spacing in mm of these slices (z between
    slices, y down the rows, x along the columns), or None where the source does not record it.
    """

    case_id: str
    volume_id: str
    images: np.ndarray
    labels: np.ndarray
    source_file: str
    slice_indices: list[int]
    split: str | None = None  # set by layouts that carry their own train/test folders
    spacing: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class SliceOptions:
    """The config keys every volumetric adapter shares, read and checked once."""

    resolution: int
    intensity: dict
    empty_slices: str
    test_fraction: float
    split_seed: int
    split: str
    limit: int | None

    @classmethod
    def from_config(cls, name: str, cfg: dict, default_intensity: dict) -> SliceOptions:
        resolution = config_option(name, cfg, "resolution", ConfigError, int)
        intensity = dict(config_option(name, cfg, "intensity", default_intensity, dict))
        empty_slices = config_option(name, cfg, "empty_slices", "drop", str)
        test_fraction = config_option(name, cfg, "test_fraction", 0.3, (int, float))
        split_seed = config_option(name, cfg, "split_seed", 0, int)
        split = config_option(name, cfg, "split", "random", str)
        limit = config_option(name, cfg, "limit", None, int)
        if resolution < 8:
            raise ConfigError(f"datasets.{name}.resolution", f"must be at least 8, got {resolution}")
        check_intensity(f"datasets.{name}.intensity", intensity)
        if empty_slices not in EMPTY_SLICE_POLICIES:
            raise ConfigError(f"datasets.{name}.empty_slices", f"must be one of {EMPTY_SLICE_POLICIES}, got {empty_slices!r}")
        if not 0 < test_fraction < 1:
            raise ConfigError(f"datasets.{name}.test_fraction", f"must be in (0, 1), got {test_fraction}")
        if split not in ("random", "layout"):
            raise ConfigError(f"datasets.{name}.split", f"must be 'random' or 'layout', got {split!r}")
        if limit is not None and limit < 2:
            raise ConfigError(f"datasets.{name}.limit", f"must be at least 2 cases, got {limit}")
        return cls(resolution, intensity, empty_slices, float(test_fraction), split_seed, split, limit)


def check_intensity(key: str, intensity: dict) -> None:
    """Refuse an intensity setting that cannot normalise to [0, 1]."""
    mode = intensity.get("mode")
    if mode not in INTENSITY_MODES:
        raise ConfigError(f"{key}.mode", f"must be one of {INTENSITY_MODES}, got {mode!r}")
    bounds_key = {"window": "window", "percentile": "percentiles"}.get(mode)
    if bounds_key is not None:
        bounds = intensity.get(bounds_key)
        if not (isinstance(bounds, list) and len(bounds) == 2 and bounds[0] < bounds[1]):
            raise ConfigError(f"{key}.{bounds_key}", f"must be [low, high] with low < high, got {bounds!r}")
        if mode == "percentile" and not 0 <= bounds[0] < bounds[1] <= 100:
            raise ConfigError(f"{key}.percentiles", f"must lie in [0, 100], got {bounds}")


def normalise_intensity(volume: np.ndarray, intensity: dict, path) -> np.ndarray:
    """Map a case's intensities to [0, 1].

    ``window``: clip to [low, high] (CT Hounsfield units, e.g. TransUNet's [-125, 275] abdomen
    window) and rescale. ``percentile``: per-case robust min-max between two percentiles (the usual
    MRI choice, as nnU-Net's and most 2D cardiac pipelines). ``none``: the source is already in
    [0, 1] (the TransUNet and SSL4MIS files are stored normalised); anything outside is refused
    later by the canonical writer, naming this file.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if not np.isfinite(volume).all():
        raise InputDataError(path, "NaN or infinite intensities")
    mode = intensity["mode"]
    if mode == "none":
        return volume
    if mode == "window":
        low, high = intensity["window"]
    else:
        low, high = np.percentile(volume, intensity["percentiles"])
    if high <= low:
        return np.zeros_like(volume)  # a constant case: nothing to stretch
    return np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)


def read_nifti(path: Path, what: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """A NIfTI volume in RAS orientation (so axial slices run along the last axis) and its spacing."""
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(image.dataobj)
    except Exception as err:  # nibabel raises several types for truncated or foreign files
        raise InputDataError(path, f"cannot read {what} as NIfTI: {err}") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise InputDataError(path, f"{what} has {data.ndim} dimensions, expected a 2D or 3D volume")
    if data.ndim == 2:
        data = data[..., None]
    return data, tuple(float(s) for s in image.header.get_zooms()[:3])


def nifti_axial_slices(data: np.ndarray) -> np.ndarray:
    """(X, Y, Z) RAS volume -> (Z, H, W) upright axial slices (anterior up, subject's left on the left).

    The same rotation as the MNI152 adapter, so every NIfTI source is shown in one convention.
    """
    return np.ascontiguousarray(np.rot90(np.moveaxis(data, 2, 0), axes=(1, 2)))


def axial_spacing(zooms: tuple[float, ...]) -> tuple[float, float, float] | None:
    """The (z, y, x) spacing of :func:`nifti_axial_slices`' (Z, H, W) stack from the RAS volume's (X, Y, Z)
    zooms (its rows run along Y, its columns along X), or None for a 2D file (no slice thickness)."""
    if len(zooms) < 3:
        return None
    return float(zooms[2]), float(zooms[1]), float(zooms[0])


def read_array_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``image`` and ``label`` of an HDF5 (``.h5``) or NumPy (``.npz``) slice or volume file."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as arrays:
                found = {k: np.asarray(arrays[k]) for k in ("image", "label") if k in arrays.files}
        else:
            import h5py

            with h5py.File(path, "r") as arrays:
                found = {k: np.asarray(arrays[k]) for k in ("image", "label") if k in arrays}
    except Exception as err:  # zip, HDF5 and pickle errors of corrupt files differ by library
        raise InputDataError(path, f"cannot read: {err}") from err
    missing = [k for k in ("image", "label") if k not in found]
    if missing:
        raise InputDataError(path, f"lacks the array(s) {missing}; expected 'image' and 'label'")
    image, label = found["image"], found["label"]
    if image.shape != label.shape or image.ndim not in (2, 3):
        raise InputDataError(path, f"image {image.shape} and label {label.shape} must be equal 2D or 3D shapes")
    return image, label


def case_id_from(path: Path, pattern: str) -> str:
    """The case id a file name carries (e.g. ``patient001``, ``case0005``), or a clear error."""
    match = re.search(pattern, path.name)
    if match is None:
        raise InputDataError(path, f"file name does not contain a case id matching {pattern!r}")
    return match.group(0)


def array_file_volume(path: Path, case_pattern: str, options: SliceOptions, label_map: dict[int, int],
                      n_classes: int, split: str | None = None) -> Volume:
    """One HDF5/NPZ file as a volume: a 2D slice file (its slice number from ``slice_K`` / ``sliceK``
    in the name) or a 3D volume with slices along the first axis, as SSL4MIS and TransUNet store them."""
    image, labels = read_array_file(path)
    case = case_id_from(path, case_pattern)
    stem = path.name.split(".")[0]
    if image.ndim == 2:
        match = re.search(r"_slice_?(\d+)$", stem)
        if match is None:
            raise InputDataError(path, "a 2D slice file needs its slice number in the name (…_slice_K or …_sliceK)")
        volume_id, slice_indices = stem[: match.start()], [int(match.group(1))]
        image, labels = image[None], labels[None]
    else:
        volume_id, slice_indices = stem, list(range(len(image)))
    return Volume(
        case_id=case,
        volume_id=volume_id,
        images=normalise_intensity(image, options.intensity, path)[:, None],
        labels=map_labels(path, labels, label_map, n_classes),
        source_file=str(path),
        slice_indices=slice_indices,
        split=split,
    )


def map_labels(path, labels: np.ndarray, label_map: dict[int, int], n_classes: int) -> np.ndarray:
    """Raw label values -> class indices; values absent from ``label_map`` are refused, naming them."""
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise InputDataError(path, "label volume holds non-integer values")
    raw = labels.astype(np.int64)
    present = np.unique(raw).tolist()
    unknown = [v for v in present if v not in label_map]
    if unknown:
        raise InputDataError(path, f"label values {unknown[:10]} are outside the declared labels {sorted(label_map)}")
    lookup = np.zeros(max(label_map) + 1, dtype=np.uint8)
    for value, index in label_map.items():
        lookup[value] = index
    mapped = lookup[raw]
    assert mapped.max(initial=0) < n_classes
    return mapped


def square_resize(stack: np.ndarray, resolution: int, mode: str) -> np.ndarray:
    """Zero-pad (N, H, W) slices to square (keeping the aspect ratio) and resize to ``resolution``².

    ``mode`` is MONAI's: ``area`` for intensities, ``nearest`` for labels.
    """
    import torch
    from monai.transforms import Resize

    n, h, w = stack.shape
    side = max(h, w)
    padded = np.zeros((n, side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    padded[:, top : top + h, left : left + w] = stack
    resized = Resize(spatial_size=(resolution, resolution), mode=mode)(torch.from_numpy(padded))
    return np.asarray(resized, dtype=np.float32)


def resized_spacing(spacing: tuple[float, float, float] | None, shape: tuple[int, int],
                    resolution: int) -> tuple[float, float, float]:
    """The (z, y, x) spacing in mm of :func:`square_resize`'s output for (H, W) = ``shape`` slices of
    ``spacing``: padding to the square side max(H, W) keeps the pixels, resizing that side to ``resolution``
    scales each in-plane spacing by side / resolution; z is unchanged. NaN throughout when unknown."""
    if spacing is None:
        return (np.nan, np.nan, np.nan)
    scale = max(shape) / resolution
    return float(spacing[0]), float(spacing[1]) * scale, float(spacing[2]) * scale


def build_slices(
    name: str, kind: str, volumes: list[Volume], options: SliceOptions, class_names: list[str], meta: dict
) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """Split ``volumes`` by case, apply the empty-slice policy, resize; return (images, masks, index rows, meta).

    Every row carries its ``volume_id`` and the (z, y, x) spacing of the resized grid (:func:`resized_spacing`;
    NaN where the volume has none), the optional volume columns of the canonical format.

    With ``split: layout`` every volume must carry the split of the folder it came from; otherwise
    a seeded case-level split with ``test_fraction`` (the papers' 7:3) is drawn. ``limit`` keeps the
    first cases in sorted order (for small runs and tests).
    """
    root = meta.get("root", name)
    if not volumes:
        raise InputDataError(root, "no cases found")
    seen: dict[str, str] = {}
    for volume in volumes:
        for z in volume.slice_indices:
            sample_id = f"{volume.volume_id}_s{z:03d}"
            if sample_id in seen:
                raise InputDataError(volume.source_file, f"duplicate sample {sample_id!r}, also read from {seen[sample_id]}")
            seen[sample_id] = volume.source_file
    case_ids = sorted({v.case_id for v in volumes})
    if options.limit is not None:
        case_ids = case_ids[: options.limit]
        volumes = [v for v in volumes if v.case_id in set(case_ids)]
    volumes = sorted(volumes, key=lambda v: (v.case_id, v.volume_id, v.slice_indices[0]))
    if options.split == "layout":
        splits: dict[str, str] = {}
        for volume in volumes:
            if volume.split is None:
                raise ConfigError(f"datasets.{name}.split", f"'layout' needs train/test folders; {volume.source_file} is in neither")
            if splits.setdefault(volume.case_id, volume.split) != volume.split:
                raise InputDataError(volume.source_file, f"case {volume.case_id} appears in both the train and test folders")
    else:
        try:
            splits = case_split(case_ids, options.test_fraction, options.split_seed)
        except ValueError as err:
            raise InputDataError(root, str(err)) from err

    images, masks, rows = [], [], []
    n_empty_dropped = 0
    for volume in volumes:
        keep = np.ones(len(volume.labels), dtype=bool)
        if options.empty_slices == "drop":
            keep = volume.labels.reshape(len(volume.labels), -1).any(axis=1)
            n_empty_dropped += int((~keep).sum())
        if not keep.any():
            continue
        kept = volume.images[keep]
        s, c, h, w = kept.shape
        resized = square_resize(kept.reshape(s * c, h, w), options.resolution, "area")
        images.append(np.clip(resized, 0.0, 1.0).reshape(s, c, options.resolution, options.resolution))
        labels = volume.labels[keep].astype(np.float32)
        masks.append(square_resize(labels, options.resolution, "nearest").astype(np.uint8))
        spacing = dict(zip(SPACING_COLUMNS, resized_spacing(volume.spacing, (h, w), options.resolution)))
        rows += [
            {
                "sample_id": f"{volume.volume_id}_s{z:03d}",
                "case_id": volume.case_id,
                "split": splits[volume.case_id],
                "source_file": volume.source_file,
                "slice_index": z,
                "volume_id": volume.volume_id,
                **spacing,
            }
            for z, k in zip(volume.slice_indices, keep)
            if k
        ]
    if not rows:
        raise InputDataError(root, "no slices left after the empty-slice policy")
    full_meta = {
        "dataset": name,
        "kind": kind,
        "class_names": class_names,
        "intensity": options.intensity,
        "empty_slices": options.empty_slices,
        "n_empty_slices_dropped": n_empty_dropped,
        "split_source": "layout" if options.split == "layout" else {
            "test_fraction": options.test_fraction, "split_seed": options.split_seed},
        "n_cases": len(case_ids),
        **meta,
    }
    return np.concatenate(images), np.concatenate(masks), rows, full_meta
