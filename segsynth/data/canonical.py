"""The one on-disk dataset format that every workflow stage reads.

A dataset directory holds ``images.npy`` (float32, N x C x H x W, in [0, 1]), ``masks.npy`` (uint8,
N x H x W, class indices), ``index.parquet`` (one row per array row) and ``meta.json``. Adapters turn
each source (a template, a folder of files, ...) into arrays plus an index; :func:`write_canonical`
is the single gate that checks them, so no stage downstream has to re-validate its input, and it
writes the directory atomically, so a failed check or a killed job never leaves a partial dataset.

Slices of 3D volumes also carry, in :data:`VOLUME_COLUMNS`, the volume they were cut from (``volume_id``, unique
per volume; a case may hold several, e.g. ACDC's ED and ES frames) and the voxel spacing in mm of the *written*
2D grid (``spacing_y`` and ``spacing_x``: the source's in-plane spacing scaled by the resize; ``spacing_z``: the
slice thickness), so the evaluation can restack a volume by ``slice_index`` and score it in mm. The columns are
optional: 2D datasets do not write them, and a spacing may be NaN where the source does not record one (the
HDF5/NPZ files of the 2D pipelines). They are additions within format version 1: a directory written before
them still loads (it is scored per slice), and they are only read where present.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segsynth.errors import ConfigError, InputDataError
from segsynth.io import atomic_dir, read_json, save_array, write_json, write_parquet

FORMAT_VERSION = 1
SPLITS = ("train", "test")
INDEX_COLUMNS = ("sample_id", "case_id", "split", "source_file", "slice_index")
#: Optional index columns of sliced volumes: the volume's id and the (z, y, x) spacing in mm of the written grid.
SPACING_COLUMNS = ("spacing_z", "spacing_y", "spacing_x")
VOLUME_COLUMNS = ("volume_id", *SPACING_COLUMNS)
#: How a segmentation score was computed (the ``unit`` column of ``evaluate_segmenter``'s table): per 2D slice
#: with distances in pixels, or per restacked 3D volume with distances in mm.
SLICE_PX = "slice·px"
VOLUME_MM = "volume·mm"

IMAGES_FILE = "images.npy"
MASKS_FILE = "masks.npy"
INDEX_FILE = "index.parquet"
META_FILE = "meta.json"


@dataclass
class SplitData:
    """The rows of one split, held in memory; ``index`` rows align with the array rows."""

    images: np.ndarray  # (N, C, H, W) float32 in [0, 1]
    masks: np.ndarray  # (N, H, W) uint8 class indices
    index: pd.DataFrame  # reset index, one row per sample


def pixel_column(class_name: str) -> str:
    """Name of the index column that counts the pixels of ``class_name`` in each mask."""
    return f"pixels_{class_name}"


def config_option(dataset: str, cfg: dict, key: str, default: Any, kind: type | tuple[type, ...]) -> Any:
    """Read ``cfg[key]`` (or ``default``) and check its type, naming the full config key on error.

    ``default`` may be ``ConfigError`` itself to mark the key as required. Booleans are refused
    where numbers are expected, since YAML turns ``yes``/``no`` into booleans silently.
    """
    full_key = f"datasets.{dataset}.{key}"
    if key not in cfg or cfg[key] is None:
        if default is ConfigError:
            raise ConfigError(full_key, "required but missing")
        return default
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(full_key, f"expected {names}, got {type(value).__name__} {value!r}")
    return value


def write_canonical(out_dir, images: np.ndarray, masks: np.ndarray, index: pd.DataFrame, meta: dict) -> None:
    """Validate a dataset and write it to ``out_dir`` in the canonical format, atomically.

    ``index`` needs the columns in :data:`INDEX_COLUMNS` and may have those in :data:`VOLUME_COLUMNS`
    (``volume_id`` with or without the spacings; see :func:`_check_volumes`); the ``pixels_<class>`` columns and the
    meta keys ``format_version``, ``channels``, ``resolution``, ``n_train`` and ``n_test`` are
    computed here from the arrays, so they cannot disagree with them. ``meta`` must name
    ``dataset``, ``kind`` and ``class_names``. Every failed check raises :class:`InputDataError`
    before anything is written.
    """
    out_dir = Path(out_dir)
    index = index.reset_index(drop=True)
    class_names = _check_meta(out_dir, meta)
    _check_index(out_dir, index)
    volume_columns = _check_volumes(out_dir, index)
    images = _check_images(out_dir, images, index)
    masks = _check_masks(out_dir, masks, images, index, class_names)

    index = index.loc[:, [*INDEX_COLUMNS, *volume_columns]].astype(
        {"sample_id": str, "case_id": str, "split": str, "source_file": str, "slice_index": "int64",
         **({"volume_id": str} if volume_columns else {}), **{c: "float64" for c in volume_columns[1:]}}
    )
    for k, class_name in enumerate(class_names):
        index[pixel_column(class_name)] = (masks == k).sum(axis=(1, 2), dtype=np.int64)

    n_train = int((index["split"] == "train").sum())
    full_meta = {
        **meta,
        "format_version": FORMAT_VERSION,
        "class_names": class_names,
        "channels": int(images.shape[1]),
        "resolution": [int(images.shape[2]), int(images.shape[3])],
        "n_train": n_train,
        "n_test": len(index) - n_train,
    }
    with atomic_dir(out_dir) as tmp:
        save_array(tmp / IMAGES_FILE, images)
        save_array(tmp / MASKS_FILE, masks)
        write_parquet(tmp / INDEX_FILE, index)
        write_json(tmp / META_FILE, full_meta)


def read_meta(data_dir) -> dict:
    """Read ``meta.json`` of a canonical dataset, refusing a missing file or another format version."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise InputDataError(path, "missing; not a canonical segsynth dataset (run the split rule first)")
    meta = read_json(path)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise InputDataError(
            path, f"format_version {version!r}, this segsynth reads {FORMAT_VERSION}; rebuild the dataset"
        )
    return meta


def load_split(data_dir, split: str) -> SplitData:
    """Load the rows of ``split`` ("train", "test" or "all") into memory.

    The arrays are memory-mapped and only the selected rows are copied, so loading the test split
    of a large dataset does not read the training images.
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
    data_dir = Path(data_dir)
    read_meta(data_dir)
    paths = {name: data_dir / name for name in (IMAGES_FILE, MASKS_FILE, INDEX_FILE)}
    for path in paths.values():
        if not path.is_file():
            raise InputDataError(path, "missing from the dataset directory")
    index = pd.read_parquet(paths[INDEX_FILE])
    images = np.load(paths[IMAGES_FILE], mmap_mode="r")
    masks = np.load(paths[MASKS_FILE], mmap_mode="r")
    if not len(images) == len(masks) == len(index):
        raise InputDataError(
            data_dir, f"row counts disagree: images {len(images)}, masks {len(masks)}, index {len(index)}"
        )
    rows = np.arange(len(index)) if split == "all" else np.flatnonzero(index["split"].to_numpy() == split)
    return SplitData(
        images=np.array(images[rows]),
        masks=np.array(masks[rows]),
        index=index.iloc[rows].reset_index(drop=True),
    )


def _check_meta(out_dir: Path, meta: dict) -> list[str]:
    for key in ("dataset", "kind", "class_names"):
        if key not in meta:
            raise InputDataError(out_dir, f"meta lacks '{key}'")
    class_names = [str(c) for c in meta["class_names"]]
    if len(class_names) < 2 or len(set(class_names)) != len(class_names) or not all(class_names):
        raise InputDataError(out_dir, f"class_names must be at least two distinct names, got {class_names}")
    if len(class_names) > 256:
        raise InputDataError(out_dir, f"{len(class_names)} classes do not fit the uint8 masks")
    return class_names


def _check_index(out_dir: Path, index: pd.DataFrame) -> None:
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise InputDataError(out_dir, f"index lacks columns {missing}")
    duplicated = index["sample_id"][index["sample_id"].duplicated()].unique().tolist()
    if duplicated:
        raise InputDataError(out_dir, f"duplicate sample ids: {duplicated[:10]}")
    bad_splits = sorted(set(index["split"]) - set(SPLITS))
    if bad_splits:
        raise InputDataError(out_dir, f"split values {bad_splits} are not in {list(SPLITS)}")
    for split in SPLITS:
        if not (index["split"] == split).any():
            raise InputDataError(out_dir, f"the {split} split is empty after filtering")
    splits_per_case = index.groupby("case_id")["split"].nunique()
    leaking = splits_per_case[splits_per_case > 1].index.tolist()
    if leaking:
        raise InputDataError(out_dir, f"case ids in both train and test: {leaking[:10]}")


def _check_volumes(out_dir: Path, index: pd.DataFrame) -> list[str]:
    """The optional volume columns ``index`` has (none, ``volume_id``, or ``volume_id`` and the three spacings),
    checked; an error names the source file of the first offending row.

    ``volume_id``: a non-empty string on every row; a volume lies in one case and holds each ``slice_index``
    once (the evaluation restacks it by slice index). Spacings: numbers, per row either all three NaN (unknown)
    or all positive and finite, and one (z, y, x) triple shared by all rows of a volume.
    """
    present = [c for c in VOLUME_COLUMNS if c in index.columns]
    if not present:
        return []
    if present not in (["volume_id"], list(VOLUME_COLUMNS)):
        raise InputDataError(out_dir, f"index has the volume columns {present}; give volume_id alone or "
                             f"with all of {list(SPACING_COLUMNS)}")
    volume = index["volume_id"]
    bad = volume.isna() | ~volume.map(lambda v: isinstance(v, str) and v != "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputDataError(index["source_file"][row], f"sample {index['sample_id'][row]} has volume_id "
                             f"{volume[row]!r}; expected a non-empty string")
    cases = index.groupby("volume_id", sort=False)["case_id"].nunique()
    if (cases > 1).any():
        name = cases.index[cases > 1][0]
        row = int(np.flatnonzero((volume == name).to_numpy())[0])
        raise InputDataError(index["source_file"][row], f"volume {name!r} spans the cases "
                             f"{sorted(index.loc[volume == name, 'case_id'].unique().tolist())}")
    repeated = index.duplicated(["volume_id", "slice_index"])
    if repeated.any():
        row = int(np.flatnonzero(repeated.to_numpy())[0])
        raise InputDataError(index["source_file"][row], f"volume {volume[row]!r} holds slice_index "
                             f"{index['slice_index'][row]} twice (sample {index['sample_id'][row]})")
    if len(present) == 1:
        return present
    for column in SPACING_COLUMNS:
        values = index[column]
        if not (pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)):
            raise InputDataError(out_dir, f"index column {column} has dtype {values.dtype}; expected spacings in mm")
    spacing = index[list(SPACING_COLUMNS)].to_numpy(dtype=np.float64)
    unknown = np.isnan(spacing).all(axis=1)
    valid = unknown | (np.isfinite(spacing) & (spacing > 0)).all(axis=1)
    if not valid.all():
        row = int(np.flatnonzero(~valid)[0])
        raise InputDataError(index["source_file"][row], f"sample {index['sample_id'][row]} has spacing (z, y, x) "
                             f"{tuple(spacing[row].tolist())} mm; expected three positive finite numbers or all NaN")
    key = np.where(unknown[:, None], -1.0, spacing)  # NaN never equals NaN: compare unknown as -1
    per_volume = pd.DataFrame(key, columns=list(SPACING_COLUMNS)).assign(volume_id=volume).drop_duplicates()
    mixed = per_volume["volume_id"].duplicated()
    if mixed.any():
        name = per_volume["volume_id"][mixed].iloc[0]
        row = int(np.flatnonzero((volume == name).to_numpy())[0])
        spacings = sorted({tuple(s) for s in spacing[(volume == name).to_numpy()].tolist()})
        raise InputDataError(index["source_file"][row], f"the rows of volume {name!r} disagree on the spacing "
                             f"(z, y, x): {spacings[:3]}")
    return present


def _check_images(out_dir: Path, images: np.ndarray, index: pd.DataFrame) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or len(images) != len(index):
        raise InputDataError(out_dir, f"images have shape {images.shape}, expected ({len(index)}, C, H, W)")
    if not np.issubdtype(images.dtype, np.floating):
        raise InputDataError(out_dir, f"images have dtype {images.dtype}, expected floating point in [0, 1]")
    images = images.astype(np.float32, copy=False)
    finite = np.isfinite(images).all(axis=(1, 2, 3))
    if not finite.all():
        files = index["source_file"][~finite].unique().tolist()
        raise InputDataError(files[0], f"NaN or infinite intensities (in {(~finite).sum()} samples from {files[:5]})")
    in_range = ((images >= 0) & (images <= 1)).all(axis=(1, 2, 3))
    if not in_range.all():
        files = index["source_file"][~in_range].unique().tolist()
        raise InputDataError(files[0], f"intensities outside [0, 1] (in {(~in_range).sum()} samples from {files[:5]})")
    return images


def _check_masks(
    out_dir: Path, masks: np.ndarray, images: np.ndarray, index: pd.DataFrame, class_names: list[str]
) -> np.ndarray:
    masks = np.asarray(masks)
    expected = (images.shape[0], *images.shape[2:])
    if masks.shape != expected:
        raise InputDataError(out_dir, f"masks have shape {masks.shape}, images need {expected}")
    if not np.issubdtype(masks.dtype, np.integer):
        raise InputDataError(out_dir, f"masks have dtype {masks.dtype}, expected integer class indices")
    valid = ((masks >= 0) & (masks < len(class_names))).all(axis=(1, 2))
    if not valid.all():
        row = int(np.flatnonzero(~valid)[0])
        values = np.unique(masks[row])
        bad = values[(values < 0) | (values >= len(class_names))].tolist()
        raise InputDataError(
            index["source_file"][row],
            f"mask of sample {index['sample_id'][row]} has values {bad} outside 0..{len(class_names) - 1}",
        )
    return masks.astype(np.uint8, copy=False)
