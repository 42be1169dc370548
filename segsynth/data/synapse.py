"""Synapse multi-organ abdominal CT (BTCV, Landman and Warfield 2015).

Two layouts:

- ``transunet``: the preprocessed copy of TransUNet (Chen et al. 2021) that most 2D papers use:
  ``<root>/train_npz/caseNNNN_sliceKKK.npz`` slices and ``<root>/test_vol_h5/caseNNNN.npy.h5``
  volumes (slices along the first axis), ``image`` already clipped to [-125, 275] HU and scaled to
  [0, 1], ``label`` with TransUNet's 8 organs (1 aorta, 2 gallbladder, 3 left kidney, 4 right
  kidney, 5 liver, 6 pancreas, 7 spleen, 8 stomach). ``split: layout`` keeps TransUNet's 18/12
  cases (``train_npz`` / ``test_vol_h5``).
- ``btcv``: the raw challenge NIfTI, ``<root>/img/imgNNNN.nii.gz`` and ``<root>/label/labelNNNN.nii.gz``
  with the 13 BTCV labels. ``label_set: transunet8`` (default) maps them to TransUNet's 8 organs
  (the other five become background), as TransUNet's preprocessing does; ``btcv13`` keeps all 13.
  Intensities are windowed to [-125, 275] HU by default, TransUNet's abdomen window.

The split is by case (a CT scan), the papers' 7:3 by default.
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
    map_labels,
    nifti_axial_slices,
    normalise_intensity,
    read_nifti,
)
from segsynth.errors import ConfigError, InputDataError

TRANSUNET8 = ["background", "aorta", "gallbladder", "kidney_l", "kidney_r", "liver", "pancreas", "spleen", "stomach"]
BTCV13 = [
    "background", "spleen", "kidney_r", "kidney_l", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "ivc", "portal_splenic_veins", "pancreas", "adrenal_r", "adrenal_l",
]
# BTCV label value -> TransUNet class index; the five structures TransUNet does not evaluate become background.
BTCV_TO_TRANSUNET8 = {
    BTCV13.index(organ): TRANSUNET8.index(organ) if organ in TRANSUNET8 else 0 for organ in BTCV13
}
CASE = r"case\d+"
LAYOUTS = {
    "transunet": {"mode": "none"},
    "btcv": {"mode": "window", "window": [-125, 275]},
}
TRANSUNET_FOLDERS = {"train_npz": "train", "test_vol_h5": "test"}


def build_synapse(name: str, cfg: dict) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, dict]:
    """Read a Synapse copy in either layout; return (images, masks, index, meta)."""
    root = Path(config_option(name, cfg, "root", ConfigError, str))
    layout = config_option(name, cfg, "layout", "transunet", str)
    label_set = config_option(name, cfg, "label_set", "transunet8", str)
    if layout not in LAYOUTS:
        raise ConfigError(f"datasets.{name}.layout", f"must be one of {list(LAYOUTS)}, got {layout!r}")
    if label_set not in ("transunet8", "btcv13"):
        raise ConfigError(f"datasets.{name}.label_set", f"must be 'transunet8' or 'btcv13', got {label_set!r}")
    if layout == "transunet" and label_set != "transunet8":
        raise ConfigError(f"datasets.{name}.label_set", "the TransUNet layout stores only its 8 organs")
    options = SliceOptions.from_config(name, cfg, LAYOUTS[layout])
    if not root.is_dir():
        raise InputDataError(root, "Synapse root directory does not exist")
    class_names = TRANSUNET8 if label_set == "transunet8" else BTCV13
    if layout == "transunet":
        volumes = _transunet(root, options)
    else:
        label_map = BTCV_TO_TRANSUNET8 if label_set == "transunet8" else {v: v for v in range(len(BTCV13))}
        volumes = _btcv(root, options, label_map, len(class_names))
    images, masks, rows, meta = build_slices(
        name, "synapse", volumes, options, class_names, {"root": str(root), "layout": layout, "label_set": label_set}
    )
    return images, masks, pd.DataFrame(rows), meta


def _transunet(root: Path, options: SliceOptions) -> list[Volume]:
    label_map = {v: v for v in range(len(TRANSUNET8))}
    volumes = []
    for folder, split in TRANSUNET_FOLDERS.items():
        pattern = "*.npz" if split == "train" else "*.h5"
        for path in sorted((root / folder).glob(pattern)):
            volumes.append(array_file_volume(path, CASE, options, label_map, len(TRANSUNET8), split))
    if not volumes:
        raise InputDataError(root, "no train_npz/*.npz or test_vol_h5/*.h5 files: not the TransUNet layout")
    return volumes


def _btcv(root: Path, options: SliceOptions, label_map: dict[int, int], n_classes: int) -> list[Volume]:
    volumes = []
    for image_path in sorted((root / "img").glob("img*.nii*")):
        number = re.search(r"img(\d+)", image_path.name).group(1)
        label_path = root / "label" / image_path.name.replace("img", "label", 1)
        if not label_path.is_file():
            raise InputDataError(image_path, f"no label file {label_path}")
        image, _ = read_nifti(image_path, "image")
        labels, zooms = read_nifti(label_path, "label")
        if image.shape != labels.shape:
            raise InputDataError(label_path, f"label shape {labels.shape} differs from image {image_path} {image.shape}")
        case = f"case{number}"
        volumes.append(
            Volume(
                case_id=case,
                volume_id=case,
                images=nifti_axial_slices(normalise_intensity(image, options.intensity, image_path))[:, None],
                labels=nifti_axial_slices(map_labels(label_path, labels, label_map, n_classes)),
                source_file=str(image_path),
                slice_indices=list(range(image.shape[2])),
                spacing=axial_spacing(zooms),
            )
        )
    if not volumes:
        raise InputDataError(root, "no img/img*.nii.gz files: not the raw BTCV layout")
    return volumes
