"""A nnU-Net v2 raw dataset folder: ``imagesTr/<case>_<XXXX><ending>``, ``labelsTr/<case><ending>``
and ``dataset.json`` (Isensee et al. 2021; ``documentation/dataset_format.md`` of nnU-Net).

``dataset.json`` gives the channels (``channel_names``), the labels (``labels``: name -> value,
consecutive from 0) and ``file_ending``. NIfTI files are read with nibabel in RAS orientation and cut
into axial slices; 2D natural-image files (``.png``, ``.bmp``, ``.tif``, nnU-Net's 2D convention) are
one slice each. One or three channels (grey or RGB) are supported, as the canonical format holds.
Region-based labels (tuples of values) and the ``ignore`` label have no meaning for a mask-to-image
generator and are refused. The split is by case; ``imagesTs`` has no labels in nnU-Net's format and
is not read.

Intensities: per-case 0.5/99.5 percentiles for volumes (nnU-Net itself z-scores MRI and uses
dataset-wide percentiles for CT; the generator wants [0, 1]), [0, 255] for 8-bit 2D images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from segsynth.data.canonical import config_option
from segsynth.data.volumes import (
    SliceOptions,
    Volume,
    axial_spacing,
    build_slices,
    map_labels,
    nifti_axial_slices,
    normalise_intensity,
    read_nifti,
)
from segsynth.errors import ConfigError, InputDataError
from segsynth.io import read_json

NIFTI_ENDINGS = (".nii.gz", ".nii")
IMAGE_ENDINGS = (".png", ".bmp", ".tif", ".tiff")


def build_nnunet_raw(name: str, cfg: dict) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, dict]:
    """Read a nnU-Net raw dataset; return (images, masks, index, meta)."""
    root = Path(config_option(name, cfg, "root", ConfigError, str))
    dataset_json = root / "dataset.json"
    if not dataset_json.is_file():
        raise InputDataError(dataset_json, "missing: not a nnU-Net raw dataset folder")
    try:
        spec = read_json(dataset_json)
    except ValueError as err:
        raise InputDataError(dataset_json, f"not valid JSON: {err}") from err
    ending, channels, class_names = _read_spec(dataset_json, spec)
    is_volume = ending in NIFTI_ENDINGS
    default_intensity = {"mode": "percentile", "percentiles": [0.5, 99.5]} if is_volume else {
        "mode": "window", "window": [0, 255]}
    options = SliceOptions.from_config(name, cfg, default_intensity)
    label_map = {v: v for v in range(len(class_names))}

    label_files = sorted((root / "labelsTr").glob(f"*{ending}"))
    if not label_files:
        raise InputDataError(root / "labelsTr", f"no label files ending in {ending}")
    volumes = []
    for label_path in label_files:
        case = label_path.name[: -len(ending)]
        image_paths = [root / "imagesTr" / f"{case}_{c:04d}{ending}" for c in range(len(channels))]
        for path in image_paths:
            if not path.is_file():
                raise InputDataError(label_path, f"case {case}: image channel file {path} is missing")
        stack = [_read(path, is_volume, "image")[0] for path in image_paths]
        labels, spacing = _read(label_path, is_volume, "label")
        for path, image in zip(image_paths, stack):
            if image.shape != labels.shape:
                raise InputDataError(label_path, f"label shape {labels.shape} differs from image {path} {image.shape}")
        images = np.stack([normalise_intensity(i, options.intensity, p) for i, p in zip(stack, image_paths)], axis=1)
        volumes.append(
            Volume(
                case_id=case,
                volume_id=case,
                images=images,
                labels=map_labels(label_path, labels, label_map, len(class_names)),
                source_file=str(image_paths[0]),
                slice_indices=list(range(len(labels))),
                spacing=spacing,
            )
        )
    n_listed = spec.get("numTraining")
    if isinstance(n_listed, int) and n_listed != len(volumes):
        raise InputDataError(dataset_json, f"numTraining is {n_listed} but labelsTr holds {len(volumes)} cases")
    images, masks, rows, meta = build_slices(
        name, "nnunet_raw", volumes, options, class_names,
        {"root": str(root), "channel_names": spec["channel_names"], "file_ending": ending},
    )
    return images, masks, pd.DataFrame(rows), meta


def _read_spec(path: Path, spec: dict) -> tuple[str, list[str], list[str]]:
    """file_ending, channel names in order, class names in label-value order; refusing what cannot be read."""
    for key in ("channel_names", "labels", "file_ending"):
        if key not in spec:
            raise InputDataError(path, f"lacks the key '{key}'")
    ending = spec["file_ending"]
    if ending not in NIFTI_ENDINGS + IMAGE_ENDINGS:
        raise InputDataError(path, f"file_ending {ending!r} is not supported; use one of {NIFTI_ENDINGS + IMAGE_ENDINGS}")
    channels = [spec["channel_names"][k] for k in sorted(spec["channel_names"], key=int)]
    if len(channels) not in (1, 3):
        raise InputDataError(path, f"{len(channels)} channels; segsynth reads grey (1) or RGB (3) images")
    labels = spec["labels"]
    if "ignore" in labels or any(not isinstance(v, int) for v in labels.values()):
        raise InputDataError(path, "region-based or 'ignore' labels are not supported; give one integer per class")
    values = sorted(labels.values())
    if values != list(range(len(values))) or len(values) < 2:
        raise InputDataError(path, f"label values {values} must be consecutive from 0, as nnU-Net requires")
    by_value = {v: k for k, v in labels.items()}
    return ending, channels, [by_value[v] for v in values]


def _read(path: Path, is_volume: bool, what: str) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """(S, H, W) slices of one file and their (z, y, x) spacing: axial slices of a NIfTI volume, or one 2D
    image (no spacing: nnU-Net's 2D files carry none)."""
    if is_volume:
        data, zooms = read_nifti(path, what)
        return nifti_axial_slices(data), axial_spacing(zooms)
    try:
        with Image.open(path) as image:
            image.load()
            data = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise InputDataError(path, f"cannot read {what}: {err}") from err
    if data.ndim != 2:
        raise InputDataError(path, f"{what} has shape {data.shape}; nnU-Net 2D files hold one channel each")
    return data[None], None
