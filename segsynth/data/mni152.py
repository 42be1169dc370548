"""The embedded default dataset: 2D slices of the MNI152 T1 template with CSF/GM/WM labels.

nilearn ships the MNI152 2009a (nonlinear, symmetric) T1 template and its grey- and white-matter
probability maps inside its wheel, so this dataset builds with no download and no data access
rights, which makes the whole workflow runnable anywhere. CSF is taken as ``1 - GM - WM`` inside
nilearn's brain mask; labels are 0 background, 1 CSF, 2 GM, 3 WM.

Slices are split by contiguous slabs with a gap (:func:`segsynth.data.splits.slab_split`), because
neighbouring slices are near-duplicates. Orientations are split independently, and an axial and a
coronal slice always intersect in one line of voxels, so enabling both ``axial`` and ``coronal``
shares voxels between train and test: that leaks across the split, which is why the default is
axial only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from segsynth.data.canonical import config_option
from segsynth.data.splits import slab_split
from segsynth.data.volumes import square_resize
from segsynth.errors import ConfigError

CLASS_NAMES = ["background", "csf", "gm", "wm"]
SOURCE_FILE = "nilearn:mni152_2009"
ORIENTATIONS = {"axial": 2, "coronal": 1}  # axis of the RAS volume each orientation slices along
SLICE_LETTER = {"axial": "z", "coronal": "y"}
PERCENTILES = (0.5, 99.5)


def build_mni152(name: str, cfg: dict) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, dict]:
    """Slice, label, resize and split the template; return (images, masks, index, meta)."""
    resolution = config_option(name, cfg, "resolution", 64, int)
    orientations = config_option(name, cfg, "orientations", ["axial"], list)
    test_fraction = config_option(name, cfg, "test_fraction", 0.3, (int, float))
    slab_size = config_option(name, cfg, "slab_size", 8, int)
    gap = config_option(name, cfg, "gap", 1, int)
    min_brain_fraction = config_option(name, cfg, "min_brain_fraction", 0.05, (int, float))
    if resolution < 8:
        raise ConfigError(f"datasets.{name}.resolution", f"must be at least 8, got {resolution}")
    unknown = [o for o in orientations if o not in ORIENTATIONS]
    if unknown or not orientations or len(set(orientations)) != len(orientations):
        raise ConfigError(
            f"datasets.{name}.orientations", f"must be distinct entries of {list(ORIENTATIONS)}, got {orientations}"
        )
    if not 0 <= min_brain_fraction < 1:
        raise ConfigError(f"datasets.{name}.min_brain_fraction", f"must be in [0, 1), got {min_brain_fraction}")

    t1, csf, gm, wm, brain, nilearn_version = _load_template()
    lo, hi = np.percentile(t1, PERCENTILES)
    t1 = np.clip((t1 - lo) / (hi - lo), 0.0, 1.0)
    volumes = np.stack([t1, csf, gm, wm, brain.astype(np.float32)])

    images, masks, rows = [], [], []
    n_small = n_gap = 0
    for orientation in orientations:
        axis = ORIENTATIONS[orientation]
        brain_fraction = brain.mean(axis=tuple(a for a in range(3) if a != axis))
        usable = np.flatnonzero(brain_fraction >= min_brain_fraction)
        n_small += brain.shape[axis] - len(usable)
        try:
            assignment = slab_split(len(usable), test_fraction, slab_size, gap)
        except ValueError as err:
            raise ConfigError(f"datasets.{name}", f"{orientation} slices: {err}") from err
        n_gap += len(usable) - len(assignment)
        slice_indices = [int(usable[s.position]) for s in assignment]
        channels = _slices(volumes, axis, slice_indices, resolution)  # (S, 5, R, R)
        images.append(channels[:, :1])
        masks.append(_labels(channels[:, 1:4], channels[:, 4]))
        letter = SLICE_LETTER[orientation]
        rows += [
            {
                "sample_id": f"{name}_{orientation}_{letter}{z:03d}",
                "case_id": f"{name}_{orientation}_slab{s.slab:02d}",
                "split": s.split,
                "source_file": SOURCE_FILE,
                "slice_index": z,
            }
            for s, z in zip(assignment, slice_indices)
        ]

    meta = {
        "dataset": name,
        "kind": "mni152",
        "class_names": CLASS_NAMES,
        "source": "MNI152 ICBM 2009a nonlinear symmetric T1 template with GM/WM probability maps, "
        "as shipped inside nilearn; CSF = clip(1 - GM - WM) inside nilearn's brain mask",
        "nilearn_version": nilearn_version,
        "orientations": orientations,
        "test_fraction": test_fraction,
        "slab_size": slab_size,
        "gap": gap,
        "min_brain_fraction": min_brain_fraction,
        "intensity_percentiles": {"0.5": float(lo), "99.5": float(hi)},
        "n_dropped_small_brain": n_small,
        "n_dropped_gap": n_gap,
    }
    return np.concatenate(images), np.concatenate(masks), pd.DataFrame(rows), meta


def _load_template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """The template volumes in RAS orientation: T1, CSF, GM, WM probabilities, the brain mask, nilearn's version.

    nilearn is imported here rather than at module level because its import takes seconds and only
    this dataset kind needs it.
    """
    import nibabel as nib
    import nilearn
    from nilearn import datasets

    def ras(img) -> np.ndarray:
        return np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)

    t1 = ras(datasets.load_mni152_template(resolution=1))
    gm = ras(datasets.load_mni152_gm_template(resolution=1))
    wm = ras(datasets.load_mni152_wm_template(resolution=1))
    brain = ras(datasets.load_mni152_brain_mask(resolution=1)) > 0
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    return t1, csf, gm, wm, brain, nilearn.__version__


def _slices(volumes: np.ndarray, axis: int, slice_indices: list[int], resolution: int) -> np.ndarray:
    """Cut (C, X, Y, Z) ``volumes`` into upright, square-padded slices resized to ``resolution``.

    All channels (image, probability maps, brain mask) are resized together with area averaging so
    that labels can be taken by argmax afterwards, which gives smoother masks than resizing labels.
    """
    # Rotating the (X, Y) or (X, Z) plane puts anterior or superior at the top, the subject's
    # left on the image left (neurological convention).
    stack = np.rot90(np.moveaxis(volumes, axis + 1, 0)[slice_indices], axes=(2, 3))
    n, c, h, w = stack.shape
    resized = square_resize(stack.reshape(n * c, h, w), resolution, "area")
    return np.clip(resized, 0.0, 1.0).reshape(n, c, resolution, resolution)


def _labels(tissue: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Argmax of the (S, 3, R, R) CSF/GM/WM maps inside the resized brain mask, background outside."""
    labels = (np.argmax(tissue, axis=1) + 1).astype(np.uint8)
    labels[brain < 0.5] = 0
    return labels
