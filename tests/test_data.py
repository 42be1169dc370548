"""Tests of the dataset adapters, the splits and the canonical format (segsynth.data)."""

from __future__ import annotations

import json
import socket
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import SHARED_DATA
from segsynth.data import FORMAT_VERSION, load_split, read_meta, write_canonical
from segsynth.data.adapters import prepare_dataset
from segsynth.data.splits import case_split, slab_split
from segsynth.errors import ConfigError, InputDataError

KVASIR = SHARED_DATA / "kvasir_seg"


# --- MNI152 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mni_dir(tmp_path_factory) -> Path:
    """One default MNI152 build, made with every socket connection refused (it must not download)."""
    out = tmp_path_factory.mktemp("mni") / "mni152"
    with pytest.MonkeyPatch.context() as mp:
        def refuse(*args, **kwargs):
            raise AssertionError("the mni152 adapter tried to open a network connection")

        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        prepare_dataset("mni152", {"kind": "mni152"}, out)
    return out


def test_mni152_shapes_and_labels(mni_dir):
    meta = read_meta(mni_dir)
    data = load_split(mni_dir, "all")
    n = len(data.index)
    assert data.images.shape == (n, 1, 64, 64) and data.images.dtype == np.float32
    assert data.masks.shape == (n, 64, 64) and data.masks.dtype == np.uint8
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0 and data.images.max() > 0.9
    assert set(np.unique(data.masks)) == {0, 1, 2, 3}
    assert meta["class_names"] == ["background", "csf", "gm", "wm"]
    assert meta["channels"] == 1 and meta["resolution"] == [64, 64]
    assert 110 <= n <= 150, n
    assert data.index["sample_id"].str.fullmatch(r"mni152_axial_z\d{3}").all()
    # Brain tissue sits inside the image, never on the padded border.
    assert not data.masks[:, [0, -1], :].any() and not data.masks[:, :, [0, -1]].any()


def test_mni152_split_has_no_leak(mni_dir):
    index = load_split(mni_dir, "all").index
    train, test = index[index.split == "train"], index[index.split == "test"]
    assert not set(train.case_id) & set(test.case_id)
    train_z, test_z = set(train.slice_index), set(test.slice_index)
    assert not {z + d for z in test_z for d in (-1, 0, 1)} & train_z
    assert 0.25 <= len(test) / len(index) <= 0.35
    meta = read_meta(mni_dir)
    assert (meta["n_train"], meta["n_test"]) == (len(train), len(test))


def test_mni152_is_deterministic(mni_dir, tmp_path):
    prepare_dataset("mni152", {"kind": "mni152"}, tmp_path / "again")
    first, second = load_split(mni_dir, "all"), load_split(tmp_path / "again", "all")
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.masks, second.masks)
    pd.testing.assert_frame_equal(first.index, second.index)
    assert read_meta(mni_dir) == read_meta(tmp_path / "again")


def test_mni152_rejects_unknown_orientation(tmp_path):
    with pytest.raises(ConfigError, match="orientations"):
        prepare_dataset("mni152", {"kind": "mni152", "orientations": ["sagittal"]}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- splits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, fraction, slab, gap", [(130, 0.3, 8, 1), (100, 0.2, 5, 2), (40, 0.5, 4, 0)])
def test_slab_split_is_contiguous_with_gap(n, fraction, slab, gap):
    kept = slab_split(n, fraction, slab, gap)
    assert kept == slab_split(n, fraction, slab, gap)
    split_of = {s.position: s.split for s in kept}
    for s in kept:
        assert s.slab == s.position // slab
        for d in range(1, gap + 1):
            for neighbour in (s.position - d, s.position + d):
                assert split_of.get(neighbour, s.split) == s.split
    n_test = sum(s.split == "test" for s in kept)
    assert abs(n_test / len(kept) - fraction) < 0.1
    assert len(kept) < n if gap else len(kept) == n


def test_slab_split_refuses_split_without_test():
    with pytest.raises(ValueError, match="no test slab"):
        slab_split(10, 0.3, 8, 1)


def test_case_split_deterministic_and_both_sides():
    ids = [f"c{i}" for i in range(20)]
    split = case_split(ids, 0.3, seed=0)
    assert split == case_split(list(reversed(ids)), 0.3, seed=0)
    assert sum(v == "test" for v in split.values()) == 6
    assert split != case_split(ids, 0.3, seed=1)
    assert sorted(case_split(["a", "b"], 0.01, seed=0).values()) == ["test", "train"]


# --- canonical format ---------------------------------------------------------------------------


def _arrays(n: int = 6, classes: int = 3):
    rng = np.random.default_rng(0)
    images = rng.random((n, 2, 8, 8), dtype=np.float32)
    masks = rng.integers(0, classes, (n, 8, 8), dtype=np.uint8)
    index = pd.DataFrame(
        {
            "sample_id": [f"s{i}" for i in range(n)],
            "case_id": [f"c{i // 2}" for i in range(n)],
            "split": ["train"] * (n - 2) + ["test"] * 2,
            "source_file": [f"file{i}.png" for i in range(n)],
            "slice_index": [-1] * n,
        }
    )
    meta = {"dataset": "toy", "kind": "test", "class_names": ["bg", "a", "b"][:classes], "note": "x"}
    return images, masks, index, meta


def test_canonical_round_trip(tmp_path):
    images, masks, index, meta = _arrays()
    write_canonical(tmp_path / "ds", images, masks, index, meta)
    got = read_meta(tmp_path / "ds")
    assert got["format_version"] == FORMAT_VERSION
    assert (got["n_train"], got["n_test"], got["channels"], got["resolution"]) == (4, 2, 2, [8, 8])
    assert got["note"] == "x"
    for split, rows in (("train", slice(0, 4)), ("test", slice(4, 6)), ("all", slice(0, 6))):
        data = load_split(tmp_path / "ds", split)
        np.testing.assert_array_equal(data.images, images[rows])
        np.testing.assert_array_equal(data.masks, masks[rows])
        assert data.images.flags.writeable and not isinstance(data.images, np.memmap)
        assert data.index["sample_id"].tolist() == index["sample_id"][rows].tolist()
        assert list(data.index.index) == list(range(len(data.index)))
        for k, name in enumerate(meta["class_names"]):
            np.testing.assert_array_equal(data.index[f"pixels_{name}"], (masks[rows] == k).sum(axis=(1, 2)))
    assert not [p.name for p in tmp_path.iterdir() if p.name != "ds"]


def test_read_meta_refuses_missing_and_other_version(tmp_path):
    with pytest.raises(InputDataError, match="meta.json"):
        read_meta(tmp_path)
    images, masks, index, meta = _arrays()
    write_canonical(tmp_path / "ds", images, masks, index, meta)
    path = tmp_path / "ds" / "meta.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(InputDataError, match="format_version 99"):
        load_split(tmp_path / "ds", "train")


def _assert_refused(tmp_path, match: str, images, masks, index, meta) -> InputDataError:
    out = tmp_path / "ds"
    with pytest.raises(InputDataError, match=match) as err:
        write_canonical(out, images, masks, index, meta)
    assert not out.exists()
    assert not list(tmp_path.iterdir())
    return err.value


def test_canonical_refuses_nan(tmp_path):
    images, masks, index, meta = _arrays()
    images[3, 1, 2, 2] = np.nan
    err = _assert_refused(tmp_path, "NaN or infinite", images, masks, index, meta)
    assert err.path == "file3.png"


def test_canonical_refuses_inf(tmp_path):
    images, masks, index, meta = _arrays()
    images[1, 0, 0, 0] = np.inf
    assert _assert_refused(tmp_path, "NaN or infinite", images, masks, index, meta).path == "file1.png"


def test_canonical_refuses_duplicate_sample_ids(tmp_path):
    images, masks, index, meta = _arrays()
    index.loc[2, "sample_id"] = "s1"
    err = _assert_refused(tmp_path, r"duplicate sample ids: \['s1'\]", images, masks, index, meta)
    assert err.path == str(tmp_path / "ds")


def test_canonical_refuses_case_in_both_splits(tmp_path):
    images, masks, index, meta = _arrays()
    index.loc[3, "split"] = "test"  # c1 now has s2 in train and s3 in test
    _assert_refused(tmp_path, r"case ids in both train and test: \['c1'\]", images, masks, index, meta)


@pytest.mark.parametrize("split", ["train", "test"])
def test_canonical_refuses_empty_split(tmp_path, split):
    images, masks, index, meta = _arrays()
    index["split"] = "test" if split == "train" else "train"
    _assert_refused(tmp_path, f"the {split} split is empty", images, masks, index, meta)


def test_canonical_refuses_out_of_range_class(tmp_path):
    images, masks, index, meta = _arrays()
    masks[4, 0, 0] = 5
    err = _assert_refused(tmp_path, r"sample s4 has values \[5\]", images, masks, index, meta)
    assert err.path == "file4.png"


def _volume_arrays():
    """_arrays with the optional volume columns: three volumes of two slices (c0: v0; c1: v1, c2: v2), spacings
    (z, y, x) in mm; v2's spacing is unknown (NaN), as for HDF5/NPZ sources."""
    images, masks, index, meta = _arrays()
    index = index.assign(volume_id=[f"v{i // 2}" for i in range(6)], slice_index=[0, 1] * 3,
                         spacing_z=[5.0] * 4 + [np.nan] * 2, spacing_y=[1.0] * 4 + [np.nan] * 2,
                         spacing_x=[2.0, 2.0, 0.5, 0.5, np.nan, np.nan])
    return images, masks, index, meta


def test_canonical_keeps_the_volume_columns(tmp_path):
    images, masks, index, meta = _volume_arrays()
    write_canonical(tmp_path / "ds", images, masks, index, meta)
    got = load_split(tmp_path / "ds", "all").index
    assert list(got.columns[:9]) == ["sample_id", "case_id", "split", "source_file", "slice_index", "volume_id",
                                     "spacing_z", "spacing_y", "spacing_x"]
    assert got["volume_id"].tolist() == ["v0", "v0", "v1", "v1", "v2", "v2"]
    assert got["spacing_x"].dtype == np.float64 and got["spacing_x"].tolist()[:4] == [2.0, 2.0, 0.5, 0.5]
    assert got["spacing_z"].isna().tolist() == [False] * 4 + [True] * 2
    # volume_id alone (a volume source without spacings) is accepted too; a 2D dataset writes neither
    write_canonical(tmp_path / "ids", images, masks, index.drop(columns=["spacing_z", "spacing_y", "spacing_x"]), meta)
    assert "volume_id" in load_split(tmp_path / "ids", "all").index and "spacing_z" not in load_split(
        tmp_path / "ids", "all").index
    write_canonical(tmp_path / "flat", *_arrays())
    assert "volume_id" not in load_split(tmp_path / "flat", "all").index


@pytest.mark.parametrize("edit, match, path", [
    (lambda i: i.__setitem__("spacing_x", [2.0, 2.0, 0.5, 0.7, np.nan, np.nan]),
     r"the rows of volume 'v1' disagree on the spacing", "file2.png"),
    (lambda i: i.__setitem__("spacing_y", [1.0, 1.0, -1.0, -1.0, np.nan, np.nan]),
     r"sample s2 has spacing \(z, y, x\) \(5.0, -1.0, 0.5\) mm", "file2.png"),
    (lambda i: i.__setitem__("spacing_z", [5.0, 5.0, np.inf, np.inf, np.nan, np.nan]), "positive finite", "file2.png"),
    (lambda i: i.__setitem__("spacing_z", [5.0] * 5 + [np.nan]), "positive finite numbers or all NaN", "file4.png"),
    (lambda i: i.__setitem__("spacing_z", ["5"] * 6), "dtype", None),
    (lambda i: i.drop(columns="spacing_x", inplace=True), r"volume_id alone or with all of", None),
    (lambda i: i.__setitem__("volume_id", ["v0", "v0", "v1", "", "v2", "v2"]), "has volume_id ''", "file3.png"),
    (lambda i: i.__setitem__("volume_id", ["v0", "v1", "v1", "v1", "v2", "v2"]), r"spans the cases \['c0', 'c1'\]",
     "file1.png"),
    (lambda i: i.__setitem__("slice_index", [0, 0, 0, 1, 0, 1]), "holds slice_index 0 twice", "file1.png"),
])
def test_canonical_refuses_bad_volume_columns(tmp_path, edit, match, path):
    images, masks, index, meta = _volume_arrays()
    edit(index)
    err = _assert_refused(tmp_path, match, images, masks, index, meta)
    assert err.path == (path if path is not None else str(tmp_path / "ds"))


# --- folder adapter: fixtures -----------------------------------------------------------------------


def _write_pair(root: Path, stem: str, size=(20, 16), mask_value=255, image_ext=".png", mask_ext=".png"):
    """One RGB image and a mask holding ``mask_value`` in a square, background 0 elsewhere."""
    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(stem.encode()))
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "images" / f"{stem}{image_ext}")
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[4:12, 4:12] = mask_value
    Image.fromarray(mask).save(root / "masks" / f"{stem}{mask_ext}")


def _folder_cfg(root: Path, **extra) -> dict:
    return {
        "kind": "folder",
        "images": str(root / "images"),
        "masks": str(root / "masks"),
        "resolution": 16,
        "channels": 3,
        "class_names": ["background", "lesion"],
        "mask_values": [0, 255],
        **extra,
    }


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    for i in range(6):
        _write_pair(root, f"img{i}")
    return root


def _assert_folder_refused(tmp_path, cfg: dict, match: str) -> InputDataError:
    out = tmp_path / "out" / "ds"
    with pytest.raises(InputDataError, match=match) as err:
        prepare_dataset("toy", cfg, out)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    return err.value


def test_folder_builds_from_fixtures(folder, tmp_path):
    prepare_dataset("toy", _folder_cfg(folder, channels=1, test_fraction=0.5, split_seed=3), tmp_path / "ds")
    data = load_split(tmp_path / "ds", "all")
    assert data.images.shape == (6, 1, 16, 16)
    assert set(np.unique(data.masks)) == {0, 1}
    assert (data.index.case_id == data.index.sample_id).all()
    assert (data.index.split == "test").sum() == 3
    assert data.index.source_file.map(lambda p: Path(p).parent == folder / "images").all()
    assert (data.index.pixels_background + data.index.pixels_lesion == 16 * 16).all()
    assert read_meta(tmp_path / "ds")["split_source"] == {"test_fraction": 0.5, "split_seed": 3}


def test_folder_threshold_reads_lossy_masks(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(4):
        _write_pair(root, f"j{i}", mask_value=255, mask_ext=".jpg")
    cfg = _folder_cfg(root, mask_values=None, mask_threshold=127)
    prepare_dataset("toy", cfg, tmp_path / "ds")
    masks = load_split(tmp_path / "ds", "all").masks
    assert set(np.unique(masks)) == {0, 1}
    with pytest.raises(InputDataError, match="non-binary mask"):
        prepare_dataset("toy", _folder_cfg(root), tmp_path / "ds2")


def test_folder_refuses_corrupt_image(folder, tmp_path):
    bad = folder / "images" / "img2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    err = _assert_folder_refused(tmp_path, _folder_cfg(folder), "cannot read image")
    assert err.path == str(bad)


def test_folder_refuses_truncated_image(folder, tmp_path):
    bad = folder / "images" / "img3.png"
    bad.write_bytes(bad.read_bytes()[:-40])
    assert _assert_folder_refused(tmp_path, _folder_cfg(folder), "cannot read image").path == str(bad)


def test_folder_refuses_missing_mask(folder, tmp_path):
    (folder / "masks" / "img4.png").unlink()
    err = _assert_folder_refused(tmp_path, _folder_cfg(folder), "no mask with stem 'img4'")
    assert err.path == str(folder / "images" / "img4.png")


def test_folder_refuses_size_mismatch(folder, tmp_path):
    Image.fromarray(np.zeros((16, 24), dtype=np.uint8)).save(folder / "masks" / "img1.png")
    err = _assert_folder_refused(tmp_path, _folder_cfg(folder), "mask size 24x16 .* size 20x16")
    assert err.path == str(folder / "masks" / "img1.png")
    assert str(folder / "images" / "img1.png") in str(err)


def test_folder_refuses_undeclared_mask_values(folder, tmp_path):
    _write_pair(folder, "img5", mask_value=7)
    cfg = _folder_cfg(folder, class_names=["bg", "a", "b"], mask_values=[0, 255, 128])
    err = _assert_folder_refused(tmp_path, cfg, r"values \[7\] are not among the declared mask_values")
    assert err.path == str(folder / "masks" / "img5.png")


def test_folder_refuses_non_binary_mask(folder, tmp_path):
    mask = np.zeros((16, 20), dtype=np.uint8)
    mask[:4], mask[4:8] = 255, 128
    Image.fromarray(mask).save(folder / "masks" / "img0.png")
    err = _assert_folder_refused(tmp_path, _folder_cfg(folder), r"non-binary mask: values \[128\]")
    assert err.path == str(folder / "masks" / "img0.png")


def test_folder_refuses_duplicate_stems(folder, tmp_path):
    _write_pair(folder, "img1", image_ext=".jpg")
    err = _assert_folder_refused(tmp_path, _folder_cfg(folder), "duplicate sample id 'img1'")
    assert str(folder / "images" / "img1.png") in str(err) and str(folder / "images" / "img1.jpg") in str(err)


def test_folder_refuses_empty_split(folder, tmp_path):
    (tmp_path / "train.txt").write_text("img0\nimg1\n")
    (tmp_path / "test.txt").write_text("\n")
    split_files = {"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")}
    err = _assert_folder_refused(tmp_path, _folder_cfg(folder, split_files=split_files), "the test split is empty")
    assert err.path == str(tmp_path / "out" / "ds")


def test_folder_refuses_id_in_both_split_files(folder, tmp_path):
    (tmp_path / "train.txt").write_text("img0\nimg1\n")
    (tmp_path / "test.txt").write_text("img1\nimg2\n")
    split_files = {"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")}
    cfg = _folder_cfg(folder, split_files=split_files)
    err = _assert_folder_refused(tmp_path, cfg, r"ids \['img1'\] are also in the train list")
    assert err.path == str(tmp_path / "test.txt")


def test_folder_config_errors(folder, tmp_path):
    with pytest.raises(ConfigError, match="datasets.toy.kind"):
        prepare_dataset("toy", {**_folder_cfg(folder), "kind": "nifti"}, tmp_path / "ds")
    with pytest.raises(ConfigError, match="exactly one of mask_values and mask_threshold"):
        prepare_dataset("toy", _folder_cfg(folder, mask_threshold=127), tmp_path / "ds")
    with pytest.raises(ConfigError, match="datasets.toy.test_fraction"):
        prepare_dataset("toy", _folder_cfg(folder, test_fraction=1.5), tmp_path / "ds")
    with pytest.raises(ConfigError, match="datasets.toy.resolution"):
        prepare_dataset("toy", {k: v for k, v in _folder_cfg(folder).items() if k != "resolution"}, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


# --- folder adapter: real Kvasir-SEG ------------------------------------------------------------------


@pytest.mark.skipif(not KVASIR.is_dir(), reason=f"Kvasir-SEG not found at {KVASIR}")
def test_folder_on_kvasir(tmp_path):
    cfg = {
        "kind": "folder",
        "images": str(KVASIR / "images"),
        "masks": str(KVASIR / "masks"),
        "resolution": 64,
        "channels": 3,
        "class_names": ["background", "polyp"],
        "mask_values": [0, 255],
        "split_files": {"train": str(KVASIR / "splits" / "train.txt"), "test": str(KVASIR / "splits" / "test.txt")},
        "limit": 10,
    }
    prepare_dataset("kvasir", cfg, tmp_path / "kvasir")
    meta = read_meta(tmp_path / "kvasir")
    assert (meta["n_train"], meta["n_test"]) == (10, 10)
    train, test = load_split(tmp_path / "kvasir", "train"), load_split(tmp_path / "kvasir", "test")
    expected_test = sorted((KVASIR / "splits" / "test.txt").read_text().split())[:10]
    assert test.index.sample_id.tolist() == expected_test
    for data in (train, test):
        assert data.images.shape == (10, 3, 64, 64)
        assert set(np.unique(data.masks)) == {0, 1}
        assert data.images.std() > 0.05  # real photographs, not a blank decode
        polyp = data.index.pixels_polyp / (64 * 64)
        assert (polyp > 0).all() and polyp.mean() < 0.5
        assert data.index.source_file.map(lambda p: Path(p).is_file()).all()
