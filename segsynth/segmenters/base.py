"""The segmenter interface and the generic torch training loop.

Every downstream segmenter the benchmark trains (real-only baseline, real + synthetic) and every
value model the guided sampler differentiates through goes through ``Segmenter``, so a new network
family only has to say how to build its ``torch.nn.Module`` (``TorchSegmenter.build_network``) or,
for a non-torch trainer, implement the abstract methods of ``Segmenter`` directly.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
from monai.losses import DiceCELoss

from ..errors import ConfigError, InputDataError
from ..io import atomic_dir, read_json, write_json
from ..synthetic_set import SyntheticSet, load_synthetic_set  # noqa: F401  (re-exported)
from ..training import Checkpointer, default_device, step_rng

log = logging.getLogger(__name__)

META_FILE = "meta.json"
STATS_FILE = "train_stats.json"


class Segmenter(ABC):
    """A 2D multi-class segmenter: ``in_channels`` image channels in [0, 1] → ``num_classes`` classes.

    The model directory written by ``save`` holds ``meta.json`` (kind, cfg, in_channels, num_classes,
    class_names), the weights, and optionally ``train_stats.json``; ``meta.json`` alone is enough for
    ``segsynth.segmenters.load_segmenter`` to pick the class that reads the weights back.
    """

    kind: ClassVar[str]

    def __init__(self, cfg: dict, in_channels: int, num_classes: int,
                 class_names: Sequence[str] | None = None):
        self.cfg = dict(cfg)
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else [
            f"class_{k}" for k in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ConfigError("class_names", f"{len(self.class_names)} names for {self.num_classes} classes")

    @abstractmethod
    def train(self, images: np.ndarray, masks: np.ndarray, checkpoint_dir, seed: int,
              log_every: int = 50, synthetic_from: int | None = None) -> dict:
        """Train on (N,C,H,W) float32 images in [0, 1] and (N,H,W) class-index masks; return statistics.

        Rows from ``synthetic_from`` on are synthetic (None: all real). Segmenters that treat them apart use
        it (nnU-Net keeps them out of its validation folds); the torch trainers pool all rows alike.
        """

    @abstractmethod
    def predict_proba(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Softmax class probabilities, (N,K,H,W) float32, for images in [0, 1]."""

    @abstractmethod
    def as_value_model(self) -> torch.nn.Module:
        """A frozen, differentiable module: generator-range images in [-1, 1] → (N,K,H,W) probabilities."""

    @abstractmethod
    def _write_weights(self, directory: Path) -> None:
        """Write the trained parameters into ``directory`` (a temporary directory owned by ``save``)."""

    @abstractmethod
    def _read_weights(self, directory: Path) -> None:
        """Read back what ``_write_weights`` wrote."""

    def save(self, out_dir, train_stats: dict | None = None) -> None:
        """Write the model directory atomically, so a half-written model is never mistaken for a result."""
        with atomic_dir(out_dir) as tmp:
            self._write_weights(tmp)
            write_json(tmp / META_FILE, {
                "kind": self.kind, "cfg": self.cfg, "in_channels": self.in_channels,
                "num_classes": self.num_classes, "class_names": self.class_names})
            if train_stats is not None:
                write_json(tmp / STATS_FILE, train_stats)

    @classmethod
    def load(cls, model_dir) -> "Segmenter":
        """Read a model directory written by ``save`` of this same kind."""
        model_dir = Path(model_dir)
        meta = read_model_meta(model_dir)
        if meta["kind"] != cls.kind:
            raise InputDataError(model_dir / META_FILE, f"kind '{meta['kind']}' is not '{cls.kind}'")
        segmenter = cls(meta["cfg"], meta["in_channels"], meta["num_classes"], meta["class_names"])
        segmenter._read_weights(model_dir)
        return segmenter


def read_model_meta(model_dir) -> dict:
    """``meta.json`` of a model directory, with a clear error when the directory is not a model."""
    path = Path(model_dir) / META_FILE
    if not path.exists():
        raise InputDataError(path, "missing: not a segmenter model directory")
    meta = read_json(path)
    missing = {"kind", "cfg", "in_channels", "num_classes", "class_names"} - set(meta)
    if missing:
        raise InputDataError(path, f"missing keys {sorted(missing)}")
    return meta


class _ValueModel(torch.nn.Module):
    """Generator-range input ([-1, 1]) → segmenter preprocessing ([0, 1]) → softmax probabilities."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network((images + 1.0) / 2.0), dim=1)


class TorchSegmenter(Segmenter):
    """A segmenter whose model is one ``torch.nn.Module`` trained with Dice + cross-entropy.

    Training is counted in optimiser steps, not epochs, so real-only and real + synthetic runs get
    the same compute whatever the pool size. Batch indices and flips of step ``s`` come from
    ``step_rng(seed, s)``, which makes a resumed run bit-identical to an uninterrupted one on CPU.

    Config keys: ``steps``, ``batch_size``, ``lr``, ``weight_decay``, ``checkpoint_every``,
    ``augment`` (horizontal flips with p = 0.5: MNI-space brains are close to left/right symmetric),
    plus the network keys of the subclass.
    """

    WEIGHTS_FILE: ClassVar[str] = "weights.pt"

    def __init__(self, cfg: dict, in_channels: int, num_classes: int,
                 class_names: Sequence[str] | None = None, device: str | torch.device | None = None):
        super().__init__(cfg, in_channels, num_classes, class_names)
        self.device = torch.device(device) if device is not None else default_device()
        self.network: torch.nn.Module | None = None

    @abstractmethod
    def build_network(self) -> torch.nn.Module:
        """A freshly initialised network mapping (N, in_channels, H, W) to (N, num_classes, H, W) logits."""

    @property
    @abstractmethod
    def size_divisor(self) -> int:
        """The network's total down-sampling: height and width must be multiples of it, and at least twice it."""

    def _initialise(self, seed: int) -> torch.nn.Module:
        """Build the network from ``seed`` without disturbing the caller's global torch RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = self.build_network().to(self.device)
        return self.network

    def _trained_network(self) -> torch.nn.Module:
        if self.network is None:
            raise RuntimeError(f"{self.kind}: train or load the segmenter before using it")
        return self.network

    def check_inputs(self, images: np.ndarray, masks: np.ndarray | None = None) -> None:
        """Fail early, naming the mismatch, rather than deep inside a convolution."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"{self.kind}: images of shape {images.shape} do not have {self.in_channels} channels")
        height, width = images.shape[2:]
        divisor = self.size_divisor
        if height % divisor or width % divisor or min(height, width) < 2 * divisor:
            # instance norm at the bottleneck needs more than one pixel
            raise ConfigError(self.kind, f"resolution {height}x{width} is not a multiple of {divisor} "
                              f"of at least {2 * divisor}, as the network's down-sampling needs")
        if masks is not None:
            if masks.shape != (images.shape[0], height, width):
                raise ValueError(f"{self.kind}: masks of shape {masks.shape} do not match images {images.shape}")
            if masks.size and int(masks.max()) >= self.num_classes:
                raise ValueError(f"{self.kind}: mask value {int(masks.max())} but only {self.num_classes} classes")

    def train(self, images: np.ndarray, masks: np.ndarray, checkpoint_dir, seed: int,
              log_every: int = 50, synthetic_from: int | None = None) -> dict:
        self.check_inputs(images, masks)
        if len(images) == 0:
            raise ValueError(f"{self.kind}: no training samples")
        cfg = self.cfg
        total = int(cfg["steps"])
        network = self._initialise(seed)
        network.train()
        optimiser = torch.optim.AdamW(network.parameters(), lr=float(cfg["lr"]),
                                      weight_decay=float(cfg["weight_decay"]))
        loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
        checkpointer = Checkpointer(checkpoint_dir, int(cfg["checkpoint_every"]),
                                    {"network": network, "optimizer": optimiser})
        start = checkpointer.restore()
        started = time.monotonic()
        loss_value = math.nan
        for step in range(start, total):
            batch_images, batch_masks = self._batch(images, masks, seed, step)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(network(batch_images), batch_masks)
            loss.backward()
            optimiser.step()
            loss_value = float(loss.detach())
            if log_every and (step + 1) % log_every == 0:
                log.info("%s step %d/%d loss %.4f", self.kind, step + 1, total, loss_value)
            checkpointer.maybe_save(step + 1, total)
        network.eval()
        return {"steps": total, "resumed_from_step": start, "final_loss": loss_value,
                "seconds": time.monotonic() - started, "num_samples": int(len(images))}

    def _batch(self, images: np.ndarray, masks: np.ndarray, seed: int,
               step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s batch: indices drawn uniformly from the pool, optional horizontal flips."""
        rng = step_rng(seed, step)
        index = rng.integers(0, len(images), size=int(self.cfg["batch_size"]))
        batch_images = images[index].astype(np.float32, copy=False)
        batch_masks = masks[index].astype(np.int64)
        if self.cfg["augment"]:
            flip = rng.random(len(index)) < 0.5
            batch_images[flip] = batch_images[flip][..., ::-1]
            batch_masks[flip] = batch_masks[flip][..., ::-1]
        return (torch.from_numpy(batch_images).to(self.device),
                torch.from_numpy(batch_masks[:, None]).to(self.device))

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        self.check_inputs(images)
        network = self._trained_network().eval()
        out = np.empty((len(images), self.num_classes, *images.shape[2:]), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.asarray(images[start:start + batch_size], dtype=np.float32))
            logits = network(batch.to(self.device))
            out[start:start + len(batch)] = torch.softmax(logits, dim=1).cpu().numpy()
        return out

    def as_value_model(self) -> torch.nn.Module:
        """A frozen copy, so guidance can neither update nor switch the segmenter into train mode."""
        value_model = _ValueModel(copy.deepcopy(self._trained_network())).eval()
        value_model.requires_grad_(False)
        return value_model

    def _write_weights(self, directory: Path) -> None:
        torch.save(self._trained_network().state_dict(), directory / self.WEIGHTS_FILE)

    def _read_weights(self, directory: Path) -> None:
        path = directory / self.WEIGHTS_FILE
        if not path.exists():
            raise InputDataError(path, "missing weights")
        network = self.build_network().to(self.device)
        network.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        self.network = network.eval()
