"""ACDC (Bernard et al. 2018): cine cardiac MRI with RV, myocardium and LV labelled at ED and ES.

Two layouts:

- ``official``: the challenge release, ``<root>/{training,testing}/patientNNN/patientNNN_frameXX.nii.gz``
  with ``patientNNN_frameXX_gt.nii.gz`` beside it (only annotated frames are read; the 4D cine is
  not). Volumes are read in RAS orientation and cut into axial (short-axis) slices. With
  ``split: layout`` the ``training``/``testing`` folders give the split.
- ``slices``: the 2D layout of SSL4MIS and most semi-supervised cardiac code, one HDF5 or NPZ file
  per slice (``patientNNN_frameXX_slice_K.h5`` with ``image`` and ``label``), or per volume
  (``patientNNN_frameXX.h5``, slices along the first axis). Point ``root`` at one of those folders,
  not at both: the same slice would be read twice (refused as a duplicate sample).

Either way the split is by patient (both frames of a patient and all their slices stay on one side),
the papers' 7:3 by default. Intensities: per-volume 0.5/99.5 percentiles for NIfTI (the raw MRI is
unscaled); SSL4MIS files are stored min-max normalised already, so ``none``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from segsynth.data.canonical import config_option
from segsynth.data.volumes import (
    SliceOptions,
    Volume,
    array_file_volume,
    axial_spacing,
    build_slices,
    case_id_from,
    map_labels,
    nifti_axial_slices,
    normalise_intensity,
    read_nifti,
)
from segsynth.errors import ConfigError, InputDataError

CLASS_NAMES = ["background", "rv", "myo", "lv"]
LABEL_MAP = {0: 0, 1: 1, 2: 2, 3: 3}
PATIENT = r"patient\d+"
LAYOUTS = {
    "official": {"mode": "percentile", "percentiles": [0.5, 99.5]},
    "slices": {"mode": "none"},
}
SPLIT_FOLDERS = {"training": "train", "testing": "test"}


def build_acdc(name: str, cfg: dict) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, dict]:
    """Read an ACDC copy in either layout; return (images, masks, index, meta)."""
    root = Path(config_option(name, cfg, "root", ConfigError, str))
    layout = config_option(name, cfg, "layout", "official", str)
    if layout not in LAYOUTS:
        raise ConfigError(f"datasets.{name}.layout", f"must be one of {list(LAYOUTS)}, got {layout!r}")
    options = SliceOptions.from_config(name, cfg, LAYOUTS[layout])
    if not root.is_dir():
        raise InputDataError(root, "ACDC root directory does not exist")
    volumes = _official(root, options) if layout == "official" else _slice_files(root, options)
    images, masks, rows, meta = build_slices(
        name, "acdc", volumes, options, CLASS_NAMES, {"root": str(root), "layout": layout}
    )
    return images, masks, pd.DataFrame(rows), meta


def _official(root: Path, options: SliceOptions) -> list[Volume]:
    volumes = []
    for label_path in sorted(root.rglob("patient*_frame*_gt.nii*")):
        image_path = label_path.with_name(label_path.name.replace("_gt", ""))
        if not image_path.is_file():
            raise InputDataError(label_path, f"no image {image_path.name} beside this ground truth")
        image, _ = read_nifti(image_path, "image")
        labels, zooms = read_nifti(label_path, "ground truth")
        if image.shape != labels.shape:
            raise InputDataError(label_path, f"ground truth shape {labels.shape} differs from image {image_path} {image.shape}")
        patient = case_id_from(label_path, PATIENT)
        frame = re.search(r"frame\d+", label_path.name).group(0)
        image = normalise_intensity(image, options.intensity, image_path)
        labels = map_labels(label_path, labels, LABEL_MAP, len(CLASS_NAMES))
        volumes.append(
            Volume(
                case_id=patient,
                volume_id=f"{patient}_{frame}",
                images=nifti_axial_slices(image)[:, None],
                labels=nifti_axial_slices(labels),
                source_file=str(image_path),
                slice_indices=list(range(image.shape[2])),
                split=next((SPLIT_FOLDERS[p] for p in label_path.parts if p in SPLIT_FOLDERS), None),
                spacing=axial_spacing(zooms),
            )
        )
    if not volumes:
        raise InputDataError(root, "no patient*_frame*_gt.nii.gz files: not the official ACDC layout")
    return volumes


def _slice_files(root: Path, options: SliceOptions) -> list[Volume]:
    files = sorted(p for p in root.rglob("*") if p.suffix in (".h5", ".npz") and p.is_file())
    if not files:
        raise InputDataError(root, "no .h5 or .npz files: not the SSL4MIS slice layout")
    return [array_file_volume(path, PATIENT, options, LABEL_MAP, len(CLASS_NAMES)) for path in files]
