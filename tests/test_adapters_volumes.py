"""Tests of the volumetric adapters (acdc, synapse, nnunet_raw) on fixtures written in each layout."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from segsynth.config import validate_config
from segsynth.data import load_split, read_meta
from segsynth.data.adapters import prepare_dataset
from segsynth.data.synapse import BTCV13, TRANSUNET8
from segsynth.errors import ConfigError, InputDataError

R = 16  # fixture in-plane size and output resolution, so resizing changes nothing


def _labelled_volume(rng, n_slices: int, values: list[int], empty_ends: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(R, R, n_slices) image and labels: each labelled slice holds every value in ``values``."""
    image = rng.normal(100.0, 30.0, (R, R, n_slices)).astype(np.float32)
    labels = np.zeros((R, R, n_slices), dtype=np.uint8)
    for z in range(empty_ends, n_slices - empty_ends):
        for k, value in enumerate(values):
            labels[2 + 3 * k : 4 + 3 * k, 4:12, z] = value
    return image, labels


def _save_nifti(path: Path, array: np.ndarray, zooms: tuple[float, float, float] = (1.5, 1.5, 10.0)) -> None:
    """``array`` (X, Y, Z) in RAS with voxel size ``zooms`` (x, y, z) in mm."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*zooms, 1.0])), str(path))


def _assert_case_split(out: Path) -> None:
    index = load_split(out, "all").index
    per_case = index.groupby("case_id")["split"].nunique()
    assert (per_case == 1).all(), "a case crosses the train/test split"
    assert set(index.split) == {"train", "test"}


# --- ACDC ------------------------------------------------------------------------------------------


@pytest.fixture
def acdc_official(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "ACDC"
    for number, folder in [(1, "training"), (2, "training"), (3, "training"), (4, "testing")]:
        patient = f"patient{number:03d}"
        for frame in ("01", "12"):
            image, labels = _labelled_volume(rng, 6, [1, 2, 3])
            _save_nifti(root / folder / patient / f"{patient}_frame{frame}.nii.gz", image)
            _save_nifti(root / folder / patient / f"{patient}_frame{frame}_gt.nii.gz", labels)
        _save_nifti(root / folder / patient / f"{patient}_4d.nii.gz", rng.normal(size=(R, R, 6, 3)).astype(np.float32))
    return root


def test_acdc_official_reads_nifti_volumes_by_patient(acdc_official, tmp_path):
    out = tmp_path / "acdc"
    prepare_dataset("acdc", {"kind": "acdc", "root": str(acdc_official), "resolution": R, "test_fraction": 0.25}, out)
    meta, data = read_meta(out), load_split(out, "all")
    assert meta["class_names"] == ["background", "rv", "myo", "lv"]
    # 4 patients x 2 frames x 4 labelled slices (the empty first and last slice are dropped by default)
    assert data.images.shape == (32, 1, R, R) and data.masks.shape == (32, R, R)
    assert meta["n_empty_slices_dropped"] == 16 and meta["n_cases"] == 4
    assert set(np.unique(data.masks)) == {0, 1, 2, 3}
    assert 0 <= data.images.min() and data.images.max() <= 1
    assert sorted(data.index.case_id.unique()) == [f"patient{n:03d}" for n in range(1, 5)]
    assert data.index.sample_id.str.fullmatch(r"patient\d{3}_frame(01|12)_s\d{3}").all()
    assert (data.index.split == "test").sum() == 8  # one patient, both frames
    _assert_case_split(out)


def test_acdc_index_carries_volumes_and_the_resized_spacing(acdc_official, tmp_path):
    """Each frame is its own volume (two per patient); the 16² slices of 1.5 mm resized to 8² have 3 mm pixels."""
    out = tmp_path / "acdc"
    prepare_dataset("acdc", {"kind": "acdc", "root": str(acdc_official), "resolution": 8, "empty_slices": "keep"}, out)
    index = load_split(out, "all").index
    assert index.volume_id.str.fullmatch(r"patient\d{3}_frame(01|12)").all()
    assert (index.sample_id == index.volume_id + "_s" + index.slice_index.map("{:03d}".format)).all()
    assert index.groupby("case_id").volume_id.nunique().eq(2).all() and index.volume_id.nunique() == 8
    assert index.groupby("volume_id").slice_index.apply(sorted).map(list).eq([list(range(6))] * 8).all()
    assert (index.spacing_z == 10.0).all() and (index.spacing_y == 3.0).all() and (index.spacing_x == 3.0).all()
    assert index.spacing_z.dtype == np.float64 and index.volume_id.dtype == index.case_id.dtype


def test_nifti_spacing_is_scaled_by_pad_and_resize_per_axis(tmp_path):
    """An anisotropic, non-square volume: X = 16 columns of 0.8 mm, Y = 12 rows of 2 mm, 3 mm slices. Slices
    are (Y, X) = 12 × 16, padded to 16² and resized to 8²: every in-plane spacing is scaled by 16 / 8."""
    rng = np.random.default_rng(6)
    root = tmp_path / "RawData"
    for number in range(1, 4):
        image = rng.uniform(-200, 300, (16, 12, 5)).astype(np.float32)
        labels = np.zeros((16, 12, 5), dtype=np.uint8)
        labels[4:10, 3:9, 1:4] = 6  # liver
        _save_nifti(root / "img" / f"img{number:04d}.nii.gz", image, zooms=(0.8, 2.0, 3.0))
        _save_nifti(root / "label" / f"label{number:04d}.nii.gz", labels, zooms=(0.8, 2.0, 3.0))
    out = tmp_path / "synapse"
    prepare_dataset("synapse", {"kind": "synapse", "layout": "btcv", "root": str(root), "resolution": 8}, out)
    index = load_split(out, "all").index
    assert sorted(index.volume_id.unique()) == ["case0001", "case0002", "case0003"]
    assert index.slice_index.tolist() == [1, 2, 3] * 3  # the empty first and last slices are dropped
    assert (index.spacing_z == 3.0).all()
    np.testing.assert_allclose(index.spacing_y, 2.0 * 16 / 8)
    np.testing.assert_allclose(index.spacing_x, 0.8 * 16 / 8)


def test_acdc_official_layout_split_and_keep_empty(acdc_official, tmp_path):
    out = tmp_path / "acdc"
    cfg = {"kind": "acdc", "root": str(acdc_official), "resolution": R, "split": "layout", "empty_slices": "keep"}
    prepare_dataset("acdc", cfg, out)
    index = load_split(out, "all").index
    assert len(index) == 48
    assert set(index[index.split == "test"].case_id) == {"patient004"}


def test_acdc_official_refuses_unknown_labels(acdc_official, tmp_path):
    bad = acdc_official / "training" / "patient002" / "patient002_frame12_gt.nii.gz"
    labels = np.asarray(nib.load(str(bad)).dataobj).copy()
    labels[0, 0, 2] = 7
    _save_nifti(bad, labels)
    with pytest.raises(InputDataError, match=r"label values \[7\] are outside") as err:
        prepare_dataset("acdc", {"kind": "acdc", "root": str(acdc_official), "resolution": R}, tmp_path / "out")
    assert err.value.path == str(bad)
    assert not (tmp_path / "out").exists()


def test_acdc_official_refuses_shape_mismatch_and_corrupt_file(acdc_official, tmp_path):
    gt = acdc_official / "training" / "patient001" / "patient001_frame01_gt.nii.gz"
    _save_nifti(gt, np.zeros((R, R + 2, 6), dtype=np.uint8))
    cfg = {"kind": "acdc", "root": str(acdc_official), "resolution": R}
    with pytest.raises(InputDataError, match="differs from image") as err:
        prepare_dataset("acdc", cfg, tmp_path / "out")
    assert err.value.path == str(gt)
    image = acdc_official / "training" / "patient003" / "patient003_frame01.nii.gz"
    image.write_bytes(b"not a nifti file")
    _save_nifti(gt, np.zeros((R, R, 6), dtype=np.uint8))
    with pytest.raises(InputDataError, match="cannot read image as NIfTI") as err:
        prepare_dataset("acdc", cfg, tmp_path / "out")
    assert err.value.path == str(image)
    assert not (tmp_path / "out").exists()


def test_acdc_ssl4mis_slices_split_by_patient(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "slices"
    root.mkdir()
    for number in range(1, 6):
        for frame in ("01", "10"):
            _, labels = _labelled_volume(rng, 4, [1, 2, 3], empty_ends=0)
            for k in range(4):
                with h5py.File(root / f"patient{number:03d}_frame{frame}_slice_{k}.h5", "w") as f:
                    f["image"] = rng.uniform(0, 1, (R, R - 4)).astype(np.float32)
                    f["label"] = labels[:, : R - 4, k]
    out = tmp_path / "acdc"
    prepare_dataset("acdc", {"kind": "acdc", "layout": "slices", "root": str(root), "resolution": R}, out)
    data = load_split(out, "all")
    assert data.images.shape == (40, 1, R, R)  # non-square slices are padded to square
    assert set(np.unique(data.masks)) == {0, 1, 2, 3}
    assert data.index.groupby("case_id").size().eq(8).all()
    assert (data.index.split == "test").sum() == 16  # round(5 x 0.3) = 2 patients
    _assert_case_split(out)


def test_acdc_slices_refuse_missing_keys_and_corrupt_h5(tmp_path):
    root = tmp_path / "slices"
    root.mkdir()
    with h5py.File(root / "patient001_frame01_slice_0.h5", "w") as f:
        f["image"] = np.zeros((R, R), dtype=np.float32)
    cfg = {"kind": "acdc", "layout": "slices", "root": str(root), "resolution": R}
    with pytest.raises(InputDataError, match=r"lacks the array\(s\) \['label'\]"):
        prepare_dataset("acdc", cfg, tmp_path / "out")
    (root / "patient001_frame01_slice_0.h5").write_bytes(b"\x89HDF garbage")
    with pytest.raises(InputDataError, match="cannot read"):
        prepare_dataset("acdc", cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- Synapse ---------------------------------------------------------------------------------------


def test_synapse_transunet_layout(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "Synapse"
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    for case in (5, 6, 7, 9):
        for k in range(3):
            label = np.zeros((R, R), dtype=np.uint8)
            label[2:6, 2:6], label[8:12, 8:12] = 1 + k, 5 + k
            np.savez(root / "train_npz" / f"case{case:04d}_slice{k:03d}.npz",
                     image=rng.uniform(0, 1, (R, R)).astype(np.float32), label=label)
    for case in (1, 2):
        labels = np.zeros((5, R, R), dtype=np.float32)  # TransUNet stores float labels in the h5 volumes
        labels[1:4, 4:8, 4:8] = 8
        with h5py.File(root / "test_vol_h5" / f"case{case:04d}.npy.h5", "w") as f:
            f["image"] = rng.uniform(0, 1, (5, R, R)).astype(np.float32)
            f["label"] = labels
    out = tmp_path / "synapse"
    prepare_dataset("synapse", {"kind": "synapse", "root": str(root), "resolution": R, "split": "layout"}, out)
    meta, data = read_meta(out), load_split(out, "all")
    assert meta["class_names"] == TRANSUNET8
    assert len(data.index) == 4 * 3 + 2 * 3  # empty volume slices dropped
    assert set(data.index[data.index.split == "test"].case_id) == {"case0001", "case0002"}
    assert set(np.unique(data.masks)) == {0, 1, 2, 3, 5, 6, 7, 8}
    # volumes, but no spacing: TransUNet's files do not record one (scored per slice only)
    assert set(data.index.volume_id) == {f"case{c:04d}" for c in (1, 2, 5, 6, 7, 9)}
    assert data.index[["spacing_z", "spacing_y", "spacing_x"]].isna().all().all()
    _assert_case_split(out)
    prepare_dataset("synapse", {"kind": "synapse", "root": str(root), "resolution": R}, tmp_path / "random")
    _assert_case_split(tmp_path / "random")


def test_synapse_btcv_maps_13_labels_to_transunet_8(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "RawData" / "Training"
    for number in range(1, 5):
        image = rng.uniform(-1000, 1000, (R, R, 4)).astype(np.float32)
        labels = np.zeros((R, R, 4), dtype=np.uint8)
        for value in range(1, 14):  # one 1-voxel-wide stripe per BTCV organ
            labels[value - 1, 2:14, 1:3] = value
        _save_nifti(root / "img" / f"img{number:04d}.nii.gz", image)
        _save_nifti(root / "label" / f"label{number:04d}.nii.gz", labels)
    out = tmp_path / "synapse8"
    prepare_dataset("synapse", {"kind": "synapse", "layout": "btcv", "root": str(root), "resolution": R}, out)
    data = load_split(out, "all")
    assert read_meta(out)["class_names"] == TRANSUNET8
    assert data.index.case_id.str.fullmatch(r"case000[1-4]").all() and len(data.index) == 8
    # Every TransUNet organ survives; esophagus, IVC, veins and adrenals become background.
    assert set(np.unique(data.masks)) == set(range(9))
    pixels = {c: int((data.masks[0] == TRANSUNET8.index(c)).sum()) for c in ("aorta", "liver")}
    assert pixels == {"aorta": 12, "liver": 12}
    # CT window [-125, 275]: values below the window are 0, above are 1, so both ends are present.
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    out13 = tmp_path / "synapse13"
    cfg13 = {"kind": "synapse", "layout": "btcv", "label_set": "btcv13", "root": str(root), "resolution": R}
    prepare_dataset("synapse", cfg13, out13)
    assert read_meta(out13)["class_names"] == BTCV13
    assert set(np.unique(load_split(out13, "all").masks)) == set(range(14))


# --- nnU-Net raw -----------------------------------------------------------------------------------


def _nnunet_dataset_json(root: Path, channels: dict, ending: str, n: int) -> None:
    spec = {"channel_names": channels, "labels": {"background": 0, "tumour": 1, "oedema": 2},
            "numTraining": n, "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(spec))


def test_nnunet_raw_nifti(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "Dataset042_Toy"
    for number in range(6):
        image, labels = _labelled_volume(rng, 4, [1, 2])
        _save_nifti(root / "imagesTr" / f"toy_{number:03d}_0000.nii.gz", image)
        _save_nifti(root / "labelsTr" / f"toy_{number:03d}.nii.gz", labels)
    _nnunet_dataset_json(root, {"0": "MRI"}, ".nii.gz", 6)
    out = tmp_path / "nnunet"
    prepare_dataset("toy", {"kind": "nnunet_raw", "root": str(root), "resolution": R}, out)
    meta, data = read_meta(out), load_split(out, "all")
    assert meta["class_names"] == ["background", "tumour", "oedema"]
    assert data.images.shape == (12, 1, R, R)
    assert set(np.unique(data.masks)) == {0, 1, 2}
    assert (data.index.volume_id == data.index.case_id).all()
    assert data.index[["spacing_z", "spacing_y", "spacing_x"]].to_numpy().tolist() == [[10.0, 1.5, 1.5]] * 12
    _assert_case_split(out)

    _nnunet_dataset_json(root, {"0": "MRI"}, ".nii.gz", 7)
    with pytest.raises(InputDataError, match="numTraining is 7 but labelsTr holds 6"):
        prepare_dataset("toy", {"kind": "nnunet_raw", "root": str(root), "resolution": R}, tmp_path / "bad")
    (root / "imagesTr" / "toy_003_0000.nii.gz").unlink()
    _nnunet_dataset_json(root, {"0": "MRI"}, ".nii.gz", 6)
    with pytest.raises(InputDataError, match="toy_003_0000.nii.gz is missing"):
        prepare_dataset("toy", {"kind": "nnunet_raw", "root": str(root), "resolution": R}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_nnunet_raw_png_rgb(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "Dataset120_Rgb"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for number in range(4):
        for channel in range(3):
            pixels = rng.integers(0, 256, (R, R), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "imagesTr" / f"img{number}_{channel:04d}.png")
        label = np.zeros((R, R), dtype=np.uint8)
        label[4:8, 4:8], label[10:12, 2:6] = 1, 2
        Image.fromarray(label).save(root / "labelsTr" / f"img{number}.png")
    _nnunet_dataset_json(root, {"0": "R", "1": "G", "2": "B"}, ".png", 4)
    out = tmp_path / "rgb"
    prepare_dataset("rgb", {"kind": "nnunet_raw", "root": str(root), "resolution": R}, out)
    data = load_split(out, "all")
    assert data.images.shape == (4, 3, R, R)
    first = np.asarray(Image.open(root / "imagesTr" / f"{data.index.case_id[0]}_0001.png"), dtype=np.float32) / 255
    np.testing.assert_allclose(data.images[0, 1], first, atol=1e-6)
    _assert_case_split(out)


def test_nnunet_raw_refuses_missing_or_regions_json(tmp_path):
    root = tmp_path / "Dataset001"
    root.mkdir()
    with pytest.raises(InputDataError, match="dataset.json: missing"):
        prepare_dataset("x", {"kind": "nnunet_raw", "root": str(root), "resolution": R}, tmp_path / "out")
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "whole": [1, 2]}, "file_ending": ".nii.gz"}))
    with pytest.raises(InputDataError, match="region-based"):
        prepare_dataset("x", {"kind": "nnunet_raw", "root": str(root), "resolution": R}, tmp_path / "out")


# --- schema ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry, key",
    [
        ({"kind": "acdc", "root": "x", "resolution": 64, "layout": "nifti"}, "layout"),
        ({"kind": "synapse", "root": "x", "resolution": 64, "label_set": "btcv9"}, "label_set"),
        ({"kind": "nnunet_raw", "resolution": 64}, "root"),
        ({"kind": "acdc", "root": "x", "resolution": 64, "intensity": {"mode": "zscore"}}, "mode"),
        ({"kind": "synapse", "root": "x", "resolution": 64, "spacing": 1.0}, "spacing"),
    ],
)
def test_schema_refuses_bad_volume_dataset_entries(entry, key):
    config = yaml.safe_load(Path("config.yaml").read_text())
    bad = copy.deepcopy(config)
    bad["datasets"]["mni152"] = entry
    with pytest.raises(ConfigError, match=key):
        validate_config(bad)


def test_schema_accepts_volume_dataset_entries():
    config = yaml.safe_load(Path("config.yaml").read_text())
    config["datasets"] = {
        "mni152": {"kind": "acdc", "root": "/data/ACDC/database", "resolution": 256, "split": "layout",
                   "intensity": {"mode": "percentile", "percentiles": [1, 99]}},
        "synapse": {"kind": "synapse", "root": "/data/Synapse", "resolution": 256, "layout": "btcv",
                    "intensity": {"mode": "window", "window": [-125, 275]}},
        "brats": {"kind": "nnunet_raw", "root": "/data/Dataset042", "resolution": 128, "empty_slices": "keep"},
    }
    config["run"]["datasets"] = ["mni152", "synapse", "brats"]
    validate_config(config)


# --- the paper preset's placeholders -----------------------------------------------------------------


def test_paper_placeholders_are_valid_layouts_for_the_paper_preset(tmp_path):
    from segsynth.data.placeholders import write_placeholder_datasets

    paths = write_placeholder_datasets(tmp_path / "data")["datasets"]
    preset = yaml.safe_load(Path("presets/paper.yaml").read_text())["datasets"]
    for name, entry in preset.items():
        cfg = {**entry, **paths[name], "resolution": 32}
        prepare_dataset(name, cfg, tmp_path / name)
        _assert_case_split(tmp_path / name)
    assert read_meta(tmp_path / "synapse")["class_names"] == TRANSUNET8
