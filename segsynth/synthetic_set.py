"""The synthetic-set directory a synthesis job writes, read back with its consistency checks.

Torch-free on purpose: the table and figure rules read synthetic sets in an environment without PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputDataError


@dataclass
class SyntheticSet:
    """A generated set: images (N,C,H,W) float32 in [0, 1], masks (N,H,W) uint8, one record per sample."""

    images: np.ndarray
    masks: np.ndarray
    records: pd.DataFrame


def load_synthetic_set(directory) -> SyntheticSet:
    """Read a synthetic set directory and check that its three per-sample files agree."""
    directory = Path(directory)
    paths = {name: directory / name for name in ("images.npy", "masks.npy", "records.parquet")}
    for path in paths.values():
        if not path.exists():
            raise InputDataError(path, "missing from synthetic set")
    images = np.load(paths["images.npy"])
    masks = np.load(paths["masks.npy"])
    records = pd.read_parquet(paths["records.parquet"])
    if images.ndim != 4 or images.dtype != np.float32:
        raise InputDataError(paths["images.npy"], f"expected float32 (N,C,H,W), got {images.dtype} {images.shape}")
    if masks.shape != (images.shape[0], *images.shape[2:]):
        raise InputDataError(paths["masks.npy"], f"shape {masks.shape} does not match images {images.shape}")
    if len(records) != len(images) or "sample_id" not in records:
        raise InputDataError(paths["records.parquet"], f"needs a sample_id for each of the {len(images)} images")
    return SyntheticSet(images, masks, records)
