"""The nnU-Net segmenter on a GPU node, checked on the CPU: ``torch.compile`` only when asked,
augmentation workers from the job's threads (capped by the CPU affinity), cuDNN benchmarking only for
CUDA training, and a value model whose forward + backward needs no host round trip.

The value model is compared with the previous numpy/scipy implementation (kept below as the
reference) on hand-made images, with a small nnU-Net ``PlainConvUNet`` (instance norm, strides) so a
crop placed one pixel off would show. Everything here runs in a few seconds on one CPU thread.
"""

import os

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_fill_holes
from torch.utils._python_dispatch import TorchDispatchMode

from segsynth.errors import ConfigError
from segsynth.segmenters import nnunet as nn_module
from segsynth.segmenters.nnunet import (NnUNetValueModel, _bounding_boxes, _fill_holes, augmentation_workers,
                                        cudnn_for_training, cudnn_training_flags, usable_cpus)

from test_nnunet import CLASSES, blobs, nnunet_env, segmenter


# --- torch.compile ----------------------------------------------------------------------------------


def test_compile_option_is_checked():
    assert segmenter().options["compile"] is False
    assert segmenter({"compile": True}).options["compile"] is True
    with pytest.raises(ConfigError, match="segmenters.compile"):
        segmenter({"compile": "yes"})


@pytest.mark.filterwarnings("ignore:.*GradScaler is enabled, but CUDA is not available")
def test_trainer_compiles_only_when_asked(tmp_path, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from segsynth.segmenters.nnunet import NnUNetSegmenter, nnunet_paths

    images, masks = blobs(4, size=32)
    folders = NnUNetSegmenter.job_folders(tmp_path / "ckpt")
    env_before = nnunet_env()
    monkeypatch.delenv("nnUNet_compile", raising=False)
    with nnunet_paths(folders["raw"], folders["preprocessed"], folders["results"], 0):
        segmenter().prepare(images, masks, folders, None)
        trainers = {}
        for compile_, device in ((False, "cuda"), (True, "cuda"), (True, "cpu")):
            seg = NnUNetSegmenter({**segmenter().cfg, "compile": compile_}, 1, len(CLASSES), CLASSES, device=device)
            trainers[compile_, device] = seg.new_trainer(folders)
    default, asked, cpu = trainers[False, "cuda"], trainers[True, "cuda"], trainers[True, "cpu"]
    assert default.device.type == "cuda" and not default.was_initialized
    assert nnUNetTrainer._do_i_compile(default), "nnU-Net itself compiles on CUDA by default"
    assert default._do_i_compile() is False
    assert asked._do_i_compile() is True
    assert cpu._do_i_compile() is False  # nnU-Net never compiles on the CPU
    monkeypatch.setenv("nnUNet_compile", "true")  # the environment is not read: the config decides
    assert default._do_i_compile() is False
    monkeypatch.setenv("nnUNet_compile", "false")
    assert asked._do_i_compile() is True
    monkeypatch.delenv("nnUNet_compile")
    assert nnunet_env() == env_before
    assert default.num_epochs == 2 and default.save_every == 1  # the rest of the run's settings


# --- augmentation workers -----------------------------------------------------------------------------


def test_workers_follow_threads_within_the_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert usable_cpus() == 4
    assert augmentation_workers(None, threads=2) == 2
    assert augmentation_workers(None, threads=12) == 4  # nnU-Net's 12 would oversubscribe the allocation
    assert augmentation_workers(None, threads=0) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # the job's threads, as set_torch_threads sets them
    assert augmentation_workers(None) == 3
    # an explicit data_workers wins, within the affinity
    assert augmentation_workers(0) == 0
    assert augmentation_workers(2, threads=1) == 2
    assert augmentation_workers(16) == 4
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cpus() == 6 and augmentation_workers(None, threads=8) == 6


def test_training_hands_the_worker_count_to_nnunet(tmp_path, monkeypatch):
    import contextlib

    seen = []

    class Stop(Exception):
        pass

    @contextlib.contextmanager
    def spy(raw, preprocessed, results, data_workers=None):
        seen.append(data_workers)
        raise Stop
        yield

    monkeypatch.setattr(nn_module, "nnunet_paths", spy)
    monkeypatch.setattr(nn_module, "usable_cpus", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    images, masks = blobs(3, size=32)
    for cfg in ({"data_workers": None}, {"data_workers": 1}, {"data_workers": 0}):
        with pytest.raises(Stop):
            segmenter(cfg).train(images, masks, tmp_path / "ckpt", seed=0)
    assert seen == [2, 1, 0]


def test_worker_count_reaches_the_trainer_and_is_restored(tmp_path):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    from segsynth.segmenters.nnunet import nnunet_paths

    original = trainer_module.get_allowed_n_proc_DA
    with nnunet_paths(tmp_path / "r", tmp_path / "p", tmp_path / "q", data_workers=3):
        assert trainer_module.get_allowed_n_proc_DA() == 3
    assert trainer_module.get_allowed_n_proc_DA is original


# --- cuDNN --------------------------------------------------------------------------------------------


def test_cudnn_benchmark_only_for_cuda_training():
    cudnn = torch.backends.cudnn
    assert cudnn_training_flags("cpu") == {} and cudnn_training_flags(torch.device("cpu")) == {}
    assert cudnn_training_flags("cuda") == {"benchmark": True, "deterministic": False}
    assert cudnn_training_flags(torch.device("cuda", 0)) == {"benchmark": True, "deterministic": False}
    before = (cudnn.benchmark, cudnn.deterministic)
    try:
        cudnn.benchmark, cudnn.deterministic = False, True
        with cudnn_for_training("cpu"):
            assert (cudnn.benchmark, cudnn.deterministic) == (False, True)
        with pytest.raises(KeyError):
            with cudnn_for_training(torch.device("cuda")):
                assert (cudnn.benchmark, cudnn.deterministic) == (True, False)
                raise KeyError("boom")
        assert (cudnn.benchmark, cudnn.deterministic) == (False, True)
    finally:
        cudnn.benchmark, cudnn.deterministic = before


# --- value model: the previous numpy/scipy implementation, as the reference ---------------------------


def reference_masks_and_boxes(raw: torch.Tensor):
    """The value model's previous ``_nonzero_masks_and_boxes`` (host round trip + scipy)."""
    nonzero = (raw != 0).any(dim=1).cpu().numpy()
    masks, boxes = [], []
    for image_mask in nonzero:
        filled = binary_fill_holes(image_mask)
        rows, cols = np.flatnonzero(filled.any(axis=1)), np.flatnonzero(filled.any(axis=0))
        if len(rows) == 0:
            boxes.append((0, filled.shape[0], 0, filled.shape[1]))
        else:
            boxes.append((int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1))
        masks.append(filled)
    return torch.from_numpy(np.stack(masks)).to(raw.device), boxes


def reference_normalise(model, crop, mask):
    channels = []
    for c, scheme in enumerate(model.schemes):
        x = crop[:, c:c + 1]
        if scheme == "ZScoreNormalization":
            if model.use_mask_for_norm[c]:
                weight = mask.to(x.dtype)
                count = weight.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
                mean = (x * weight).sum(dim=(2, 3), keepdim=True) / count
                std = (((x - mean) * weight) ** 2).sum(dim=(2, 3), keepdim=True).div(count).sqrt()
                x = torch.where(mask, (x - mean) / std.clamp_min(1e-8), x)
            else:
                mean = x.mean(dim=(2, 3), keepdim=True)
                std = x.std(dim=(2, 3), keepdim=True, unbiased=False)
                x = (x - mean) / std.clamp_min(1e-8)
        elif scheme == "CTNormalization":
            props = model.intensity_properties[c]
            x = x.clamp(props["percentile_00_5"], props["percentile_99_5"])
            x = (x - props["mean"]) / max(props["std"], 1e-8)
        elif scheme == "RescaleTo01Normalization":
            x = x - x.amin(dim=(2, 3), keepdim=True)
            x = x / x.amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)
        elif scheme == "RGBTo01Normalization":
            x = x / 255.0
        channels.append(x)
    return torch.cat(channels, dim=1)


def reference_predict_crop(model, x):
    if model.in_plane != [0, 1]:
        x = x.transpose(2, 3)
    height, width = x.shape[2:]
    target = []
    for size, patch, div in zip((height, width), model.patch_size, model.divisor):
        size_needed = max(size, patch)
        target.append(-(-size_needed // div) * div if size_needed > patch else size_needed)
    dy, dx = target[0] - height, target[1] - width
    logits = model.network(torch.nn.functional.pad(x, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2)))
    probabilities = torch.softmax(logits[:, :, dy // 2:dy // 2 + height, dx // 2:dx // 2 + width], dim=1)
    return probabilities.transpose(2, 3) if model.in_plane != [0, 1] else probabilities


def reference_forward(model, images):
    """The value model's previous forward: boxes on the host, one network call per distinct box."""
    raw = (images + 1.0) / 2.0 * model.intensity_scale
    masks, boxes = reference_masks_and_boxes(raw.detach())
    background = torch.zeros((model.num_classes, *raw.shape[2:]), dtype=raw.dtype, device=raw.device)
    background[0] = 1.0
    groups = {}
    for i, box in enumerate(boxes):
        groups.setdefault(box, []).append(i)
    rows = [None] * raw.shape[0]
    for (y0, y1, x0, x1), index in groups.items():
        crop = raw[index, :, y0:y1, x0:x1]
        mask = masks[index, None, y0:y1, x0:x1]
        probabilities = reference_predict_crop(model, reference_normalise(model, crop, mask))
        for j, i in enumerate(index):
            row = background.clone()
            row[:, y0:y1, x0:x1] = probabilities[j]
            rows[i] = row
    return torch.stack(rows)


# --- value model: hand-made inputs --------------------------------------------------------------------


def unet(channels: int, classes: int, dtype=torch.float64) -> torch.nn.Module:
    """A small nnU-Net 2D network (instance norm, strides 1-2-2: divisor 4), random weights.

    GELU instead of nnU-Net's LeakyReLU: zero-padded, constant regions put some pre-activations at 0
    up to rounding, where the LeakyReLU's derivative jumps, so two exact implementations could differ
    in gradient by the side of the kink they land on."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    network = PlainConvUNet(channels, 3, [4, 8, 8], torch.nn.Conv2d, 3, [1, 2, 2], 1, classes, 1, conv_bias=True,
                            norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                            nonlin=torch.nn.GELU)
    return network.to(dtype).eval().requires_grad_(False)


CT = {"percentile_00_5": 0.1, "percentile_99_5": 0.8, "mean": 0.4, "std": 0.2}


def value_model(schemes, use_mask, patch, transpose=(0, 1, 2), scale=1.0, classes=3, dtype=torch.float64):
    return NnUNetValueModel(unet(len(schemes), classes, dtype), schemes=list(schemes),
                            use_mask_for_norm=list(use_mask), intensity_properties=[CT] * len(schemes),
                            intensity_scale=scale, transpose_forward=list(transpose), patch_size=list(patch),
                            divisor=[4, 4], num_classes=classes).eval()


def hand_made(channels: int, height: int, width: int, dtype=torch.float64) -> torch.Tensor:
    """Images in [-1, 1]; -1 is a raw zero. Full box; a lopsided zero frame; a ring around a zero hole
    (filled) inside a zero frame; all zero; two blobs with a zero gap; an open ring (its inside is not a
    hole); one channel zero where another is not."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:height, :width]
    base = rng.uniform(-0.9, 1.0, (7, channels, height, width))
    keep = np.ones((7, height, width), bool)
    keep[1, :3], keep[1, :, -5:], keep[1, -1:] = False, False, False
    dist = np.hypot(yy - height / 2, xx - width / 2)
    ring = (dist < min(height, width) * 0.4) & (dist > min(height, width) * 0.15)
    keep[2] = ring
    keep[3] = False
    keep[4] = False
    keep[4, 2:6, 3:8], keep[4, height - 7:height - 2, width - 6:width - 1] = True, True
    keep[5] = ring & ~((xx > width / 2) & (abs(yy - height / 2) < 2))  # a slit to the outside
    keep[6, 4:-4, 2:-6] = True
    images = np.where(keep[:, None], base, -1.0)
    if channels > 1:
        images[6, 0, 4:10] = -1.0  # channel 0 zero, the others not: still inside the mask
    return torch.from_numpy(images).to(dtype)


CASES = {
    # schemes, use_mask_for_norm, patch (network axes), transpose_forward, image (H, W), intensity scale
    "zscore": (["ZScoreNormalization"], [False], [32, 32], [0, 1, 2], (24, 20), 1.0),
    "zscore_mask_transposed": (["ZScoreNormalization", "ZScoreNormalization"], [True, False], [24, 32], [0, 2, 1],
                               (28, 21), 1.0),
    "ct_rescale_none": (["CTNormalization", "RescaleTo01Normalization", "NoNormalization"], [False] * 3, [28, 24],
                        [0, 1, 2], (27, 23), 1.0),
    "rgb": (["RGBTo01Normalization"] * 3, [False] * 3, [32, 32], [0, 1, 2], (32, 32), 255.0),
    "larger_than_patch": (["ZScoreNormalization"], [False], [16, 16], [0, 1, 2], (26, 19), 1.0),
    "larger_than_patch_mask": (["ZScoreNormalization", "RescaleTo01Normalization"], [True, False], [16, 20],
                               [0, 2, 1], (22, 30), 1.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_model_matches_the_previous_implementation(case):
    schemes, use_mask, patch, transpose, (height, width), scale = CASES[case]
    model = value_model(schemes, use_mask, patch, transpose, scale)
    images = hand_made(len(schemes), height, width)
    x_new, x_ref = images.clone().requires_grad_(True), images.clone().requires_grad_(True)
    ours, reference = model(x_new), reference_forward(model, x_ref)
    assert ours.shape == reference.shape == (len(images), 3, height, width)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-11)
    weights = torch.linspace(-1, 1, 3, dtype=images.dtype)[None, :, None, None]
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    # the previous code's z-score inside the mask differentiated sqrt at 0 for the all-zero image 3 (NaN):
    # compare where it was finite; ours is finite everywhere
    assert torch.isfinite(x_new.grad).all()
    finite = torch.isfinite(x_ref.grad).flatten(1).all(dim=1)
    assert finite.sum() >= 6
    torch.testing.assert_close(x_new.grad[finite], x_ref.grad[finite], rtol=1e-7, atol=1e-9)
    assert float(x_new.grad.abs().sum()) > 0
    if height <= max(patch) and scale == 1.0:  # the zero frame of image 1 is background
        assert torch.all(ours[1, 0, :3] == 1.0) and torch.all(ours[1, 0, :, -5:] == 1.0)


def test_value_model_float32_matches_the_previous_implementation():
    schemes, use_mask, patch, transpose, (height, width), scale = CASES["zscore_mask_transposed"]
    model = value_model(schemes, use_mask, patch, transpose, scale, dtype=torch.float32)
    images = hand_made(len(schemes), height, width, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference_forward(model, images), rtol=1e-5, atol=1e-6)


def test_fill_holes_and_boxes_match_scipy():
    rng = np.random.default_rng(0)
    masks = [rng.random((5, 23, 17)) < p for p in (0.05, 0.3, 0.55, 0.7, 0.9)]
    spiral = spiral_walls(31)  # a one-pixel corridor from the border to the centre: many passes
    closed = spiral.copy()
    closed[1, 0] = True  # the same corridor walled off: all of it is a hole
    edge = np.zeros((4, 31, 31), bool)
    edge[1] = True
    edge[2, 10:20, 10:20], edge[2, 12:18, 12:18] = True, False  # a square hole
    edge[3, 0] = True  # a border row only
    masks += [np.stack([spiral, ~spiral, closed]), edge, np.ones((1, 1, 6), bool), np.zeros((1, 3, 1), bool)]
    for batch in masks:
        nonzero = torch.from_numpy(batch)
        filled, read = _fill_holes(nonzero)
        expected, boxes = reference_masks_and_boxes(nonzero[:, None].float())
        assert read is None
        np.testing.assert_array_equal(filled.numpy(), expected.numpy())
        assert _bounding_boxes(nonzero).tolist() == [list(b) for b in boxes]
        filled, read = _fill_holes(nonzero, read_back=_bounding_boxes(nonzero))
        np.testing.assert_array_equal(filled.numpy(), expected.numpy())
        assert read == [list(b) for b in boxes]
    assert (binary_fill_holes(spiral) == spiral).all() and binary_fill_holes(closed).all()


def spiral_walls(n: int) -> np.ndarray:
    """Walls (True) around a one-pixel corridor that enters at (1, 0) and winds, square by square, to the
    centre: reaching its end takes one row or column pass per straight stretch, ~n of them."""
    walls = np.ones((n, n), bool)
    r, c, direction = 1, 1, 0
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    walls[1, 0] = False
    while True:
        walls[r, c] = False
        for turn in range(2):
            dr, dc = steps[(direction + turn) % 4]
            r2, c2 = r + 2 * dr, c + 2 * dc
            if 0 < r2 < n - 1 and 0 < c2 < n - 1 and walls[r2, c2] and walls[r + dr, c + dc]:
                direction = (direction + turn) % 4
                r, c = r + dr, c + dc
                break
        else:
            return walls


# --- value model: no host round trip ------------------------------------------------------------------


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (``.item()``, ``bool(t)``) or whose output
    shape depends on data (``nonzero``, ``masked_select``, ``unique``)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(name.startswith(s) or name.startswith("_" + s) for s in self.SYNCING):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case, host_reads", [("zscore", 0), ("ct_rescale_none", 0), ("rgb", 0),
                                               ("zscore_mask_transposed", 1), ("larger_than_patch", 1),
                                               ("larger_than_patch_mask", 1)])
def test_value_model_reads_the_host_at_most_once(case, host_reads, monkeypatch):
    import scipy.ndimage

    schemes, use_mask, patch, transpose, (height, width), scale = CASES[case]
    model = value_model(schemes, use_mask, patch, transpose, scale, dtype=torch.float32)
    images = hand_made(len(schemes), height, width, dtype=torch.float32).requires_grad_(True)
    lists = []
    original_tolist = torch.Tensor.tolist

    def tolist(self):
        lists.append(tuple(self.shape))
        return original_tolist(self)

    def forbidden(*args, **kwargs):
        raise AssertionError("host round trip")

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(torch.Tensor, "numpy", forbidden)
    monkeypatch.setattr(torch.Tensor, "cpu", forbidden)
    monkeypatch.setattr(scipy.ndimage, "binary_fill_holes", forbidden)
    with HostReads() as mode:
        out = model(images)
        out[:, 1].sum().backward()
    assert len(mode.reads) + len(lists) == host_reads, (mode.reads, lists)
    assert images.grad is not None and torch.isfinite(images.grad).all()


def test_only_a_masked_zscore_needs_the_filled_mask():
    assert value_model(["ZScoreNormalization"], [True], [32, 32])._needs_filled_mask
    assert not value_model(["ZScoreNormalization"], [False], [32, 32])._needs_filled_mask
    assert not value_model(["CTNormalization"], [True], [32, 32])._needs_filled_mask  # CT ignores the mask
