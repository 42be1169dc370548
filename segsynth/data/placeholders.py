"""Tiny placeholder copies of the papers' three datasets, in the layouts their adapters read.

``make paper-dryrun`` points ``presets/paper.yaml`` at these to resolve the whole paper DAG without the
real data; the tests run the adapters over them, so the placeholders are proven to be valid layouts.
The contents are random: nothing here is meant to be trained on.

    python -m segsynth.data.placeholders OUT_DIR    # writes OUT_DIR/{acdc,synapse,polyps} and OUT_DIR/paths.yaml
                                                    # (and polyps_unseen, paths_papers.yaml for papers_gpu.yaml)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

SIDE = 32


def _blob_labels(rng: np.random.Generator, shape: tuple[int, ...], n_classes: int) -> np.ndarray:
    """Rectangles of every class 1..n_classes-1 in the middle of each 2D slice (axis 0 is the slice)."""
    labels = np.zeros(shape, dtype=np.uint8)
    for k in range(1, n_classes):
        top, left = rng.integers(2, SIDE - 8, size=2)
        labels[:, top : top + 5, left : left + 5] = k
    return labels


def write_acdc(root: Path, rng: np.random.Generator, n_patients: int = 4) -> Path:
    """The official release layout: training/patientNNN/patientNNN_frameXX[_gt].nii.gz."""
    import nibabel as nib

    affine = np.diag([1.5, 1.5, 10.0, 1.0])
    for number in range(1, n_patients + 1):
        folder = root / "training" / f"patient{number:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for frame in ("01", "12"):
            labels = np.moveaxis(_blob_labels(rng, (4, SIDE, SIDE), 4), 0, 2)
            image = rng.normal(200, 50, labels.shape).astype(np.float32)
            nib.save(nib.Nifti1Image(image, affine), str(folder / f"patient{number:03d}_frame{frame}.nii.gz"))
            nib.save(nib.Nifti1Image(labels, affine), str(folder / f"patient{number:03d}_frame{frame}_gt.nii.gz"))
    return root


def write_synapse(root: Path, rng: np.random.Generator, n_train: int = 3, n_test: int = 2) -> Path:
    """TransUNet's layout: train_npz/caseNNNN_sliceKKK.npz and test_vol_h5/caseNNNN.npy.h5."""
    import h5py

    (root / "train_npz").mkdir(parents=True, exist_ok=True)
    (root / "test_vol_h5").mkdir(exist_ok=True)
    for case in range(n_train):
        for k in range(3):
            label = _blob_labels(rng, (1, SIDE, SIDE), 9)[0]
            np.savez(root / "train_npz" / f"case{case + 10:04d}_slice{k:03d}.npz",
                     image=rng.uniform(0, 1, (SIDE, SIDE)).astype(np.float32), label=label)
    for case in range(n_test):
        with h5py.File(root / "test_vol_h5" / f"case{case + 1:04d}.npy.h5", "w") as f:
            f["image"] = rng.uniform(0, 1, (3, SIDE, SIDE)).astype(np.float32)
            f["label"] = _blob_labels(rng, (3, SIDE, SIDE), 9).astype(np.float32)
    return root


def write_polyps(root: Path, rng: np.random.Generator, n: int = 6) -> Path:
    """Image and mask folders (PraNet's TrainDataset layout: image/*.png, mask/*.png)."""
    (root / "image").mkdir(parents=True, exist_ok=True)
    (root / "mask").mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(root / "image" / f"{i}.png")
        Image.fromarray(_blob_labels(rng, (1, SIDE, SIDE), 2)[0] * 255).save(root / "mask" / f"{i}.png")
    return root


def write_placeholder_datasets(out_dir) -> dict:
    """Write the three placeholders under ``out_dir`` and return the ``datasets`` config keys that point at them."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(0)
    acdc = write_acdc(out_dir / "acdc", rng)
    synapse = write_synapse(out_dir / "synapse", rng)
    polyps = write_polyps(out_dir / "polyps", rng)
    return {
        "datasets": {
            "acdc": {"root": str(acdc)},
            "synapse": {"root": str(synapse)},
            "polyps": {"images": str(polyps / "image"), "masks": str(polyps / "mask")},
        }
    }


def write_unseen_polyps(out_dir) -> dict:
    """The cross-domain test set of presets/papers_gpu.yaml (``polyps_unseen``) under ``out_dir``, and its keys."""
    unseen = write_polyps(Path(out_dir) / "polyps_unseen", np.random.default_rng(1))
    return {"datasets": {"polyps_unseen": {"images": str(unseen / "image"), "masks": str(unseen / "mask")}}}


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m segsynth.data.placeholders OUT_DIR")
    out_dir = Path(argv[0])
    paths = write_placeholder_datasets(out_dir)
    (out_dir / "paths.yaml").write_text(yaml.safe_dump(paths, sort_keys=False))
    # presets/papers_gpu.yaml's fourth dataset, in a file of its own: paper.yaml alone does not define it
    (out_dir / "paths_papers.yaml").write_text(yaml.safe_dump(write_unseen_polyps(out_dir), sort_keys=False))
    print(out_dir / "paths.yaml")


if __name__ == "__main__":
    main(sys.argv[1:])
