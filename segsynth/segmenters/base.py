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
from ..precision import autocast, compute_dtype, configure, grad_scaler
from ..training import Checkpointer, default_device, step_rng, step_torch_generator
from .protocol import BestCheckpoint, continue_options, cutmix_box, mean_foreground_dice, paired_cutmix

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

    def train_continue(self, real: tuple[np.ndarray, np.ndarray], synthetic: tuple[np.ndarray, np.ndarray],
                       validation: tuple[np.ndarray, np.ndarray], init_dir, checkpoint_dir, seed: int,
                       log_every: int = 50) -> dict:
        """``protocol: continue`` (segsynth.segmenters.protocol): start from the model in ``init_dir`` (the
        real-only model of this same entry), train on 1:1 real:synthetic batches of ``real`` and ``synthetic``
        (images, masks) with paired CutMix, validate on ``validation`` and keep the best weights. Returns
        statistics like ``train``."""
        raise ConfigError("segmenters.protocol", f"kind '{self.kind}' does not implement protocol 'continue'")

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

    def check_initial_model(self, init_dir) -> Path:
        """``init_dir``, a saved model this segmenter can continue from (same kind, channels and classes)."""
        init_dir = Path(init_dir)
        meta = read_model_meta(init_dir)
        mine = {"kind": self.kind, "in_channels": self.in_channels, "num_classes": self.num_classes}
        theirs = {key: meta[key] for key in mine}
        if theirs != mine:
            raise InputDataError(init_dir / META_FILE, f"the initial model is {theirs}, this segmenter {mine}")
        return init_dir

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
    plus the network keys of the subclass, plus the protocol keys (``protocol``, ``continue_steps``,
    ``val_fraction``, ``val_every``, ``cutmix_p``; segsynth.segmenters.protocol) read by ``train_continue``.
    """

    WEIGHTS_FILE: ClassVar[str] = "weights.pt"

    def __init__(self, cfg: dict, in_channels: int, num_classes: int,
                 class_names: Sequence[str] | None = None, device: str | torch.device | None = None):
        super().__init__(cfg, in_channels, num_classes, class_names)
        self.device = torch.device(device) if device is not None else default_device()
        self.network: torch.nn.Module | None = None
        #: segsynth.precision of training (train_segmenter sets the config's); cpu_autocast for tests
        self.precision = "fp32"
        self.cpu_autocast = False

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

    # --- the training objective: a segmenter with another loss overrides these ---------------------------------

    def training_forward(self, network: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor,
                         generator: torch.Generator):
        """What the loss needs of a batch, computed under the training precision's autocast: the logits here.
        ``masks`` is (B, 1, H, W) class indices; ``generator`` the step's own, for objectives that draw noise."""
        return network(images)

    def training_loss(self, output, masks: torch.Tensor) -> torch.Tensor:
        """The loss of ``training_forward``'s output, in float32: MONAI's Dice + cross-entropy of the logits."""
        if not hasattr(self, "_dice_ce"):
            self._dice_ce = DiceCELoss(softmax=True, to_onehot_y=True)
        return self._dice_ce(output.float(), masks)

    def auxiliary_modules(self) -> dict[str, torch.nn.Module]:
        """Modules trained and checkpointed beside the network but not part of the saved model (e.g. LEAF's
        feature-alignment head); none by default."""
        return {}

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
        total = int(self.cfg["steps"])
        network = self._initialise(seed)
        loop = _TrainingLoop(self, network, checkpoint_dir)
        start = loop.checkpointer.restore()
        started = time.monotonic()
        loss = None
        for step in range(start, total):
            loss = loop.step(*self._batch(images, masks, seed, step), step_torch_generator(seed, step))
            # reading the loss waits for the GPU: only when it is logged
            if log_every and (step + 1) % log_every == 0:
                log.info("%s step %d/%d loss %.4f", self.kind, step + 1, total, float(loss.detach()))
            loop.checkpointer.maybe_save(step + 1, total)
        loss_value = math.nan if loss is None else float(loss.detach())
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

    # --- protocol: continue -------------------------------------------------------------------------

    def continue_options(self, n_real: int):
        """The checked continuation settings; ``val_every`` defaults to one pass of the real stream over the
        real training cases (the reference validates every epoch of its real loader)."""
        half = self.stream_size()
        return continue_options(self.cfg, "continue_steps", int(self.cfg["steps"]), max(1, int(n_real) // half))

    def stream_size(self) -> int:
        """Real (= synthetic) samples per continuation batch: half of ``batch_size``, which must be even."""
        batch_size = int(self.cfg["batch_size"])
        if batch_size < 2 or batch_size % 2:
            raise ConfigError(f"{self.kind}.batch_size", f"protocol 'continue' splits each batch 1:1 into real and "
                              f"synthetic samples: needs an even batch size, got {batch_size}")
        return batch_size // 2

    def _initialise_from(self, init_dir) -> torch.nn.Module:
        """A network holding the weights of the saved model ``init_dir`` (same kind, channels and classes)."""
        init_dir = self.check_initial_model(init_dir)
        path = init_dir / self.WEIGHTS_FILE
        if not path.exists():
            raise InputDataError(path, "missing weights of the initial model")
        with torch.random.fork_rng(devices=[]):  # the build's random init is overwritten: keep the global RNG
            network = self.build_network().to(self.device)
        try:
            network.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        except RuntimeError as error:
            raise InputDataError(path, f"does not fit this segmenter's network: {error}") from None
        self.network = network
        return network

    def train_continue(self, real: tuple[np.ndarray, np.ndarray], synthetic: tuple[np.ndarray, np.ndarray],
                       validation: tuple[np.ndarray, np.ndarray], init_dir, checkpoint_dir, seed: int,
                       log_every: int = 50) -> dict:
        """The shared loop of ``train`` with the continuation's differences: the network starts from
        ``init_dir``'s weights; step ``s``'s batch is ``stream_size()`` real then as many synthetic samples,
        drawn by ``step_rng(seed, s)`` (flips, then paired CutMix with probability ``cutmix_p``); a fresh AdamW
        (the config's lr and weight decay); the validation Dice (``mean_foreground_dice`` of the argmax) every
        ``val_every`` steps and after the last; the best-validated weights end up in ``self.network``. The
        best weights and the validation history are checkpointed too, so a resumed run is bit-identical on CPU.
        ``continue_steps`` 0 keeps the initial weights."""
        (real_images, real_masks), (synthetic_images, synthetic_masks) = real, synthetic
        val_images, val_masks = validation
        for images, masks in (real, synthetic, validation):
            self.check_inputs(images, masks)
        if min(len(real_images), len(synthetic_images), len(val_images)) == 0:
            raise ValueError(f"{self.kind}: protocol continue needs real, synthetic and validation samples, got "
                             f"{len(real_images)}, {len(synthetic_images)}, {len(val_images)}")
        options = self.continue_options(len(real_images))
        total, val_every = options.budget, int(options.val_every)
        network = self._initialise_from(init_dir)
        best = BestCheckpoint()
        loop = _TrainingLoop(self, network, checkpoint_dir, {"best": best})
        start = loop.checkpointer.restore()
        started = time.monotonic()
        loss = None
        for step in range(start, total):
            loss = loop.step(*self._paired_batch(real, synthetic, seed, step, options.cutmix_p),
                             step_torch_generator(seed, step))
            if log_every and (step + 1) % log_every == 0:
                log.info("%s continue step %d/%d loss %.4f", self.kind, step + 1, total, float(loss.detach()))
            if (step + 1) % val_every == 0 or step + 1 == total:
                dice = self.validation_dice(val_images, val_masks)
                if best.offer(step + 1, dice, network):
                    log.info("%s continue step %d: validation Dice %.4f (best)", self.kind, step + 1, dice)
                network.train()
            loop.checkpointer.maybe_save(step + 1, total)
        loss_value = math.nan if loss is None else float(loss.detach())
        if best.weights is not None:
            network.load_state_dict(best.weights)
        network.eval()
        return {"protocol": "continue", "steps": total, "resumed_from_step": start, "final_loss": loss_value,
                "seconds": time.monotonic() - started,
                "num_samples": int(len(real_images) + len(synthetic_images)),
                "batch_real": self.stream_size(), "batch_synthetic": self.stream_size(),
                "cutmix_p": options.cutmix_p, "val_every": val_every, "n_val": int(len(val_images)),
                "best_step": 0 if best.step is None else best.step, "best_val_dice": best.dice,
                "val_dice": [[s, d] for s, d in best.history]}

    def _paired_batch(self, real: tuple[np.ndarray, np.ndarray], synthetic: tuple[np.ndarray, np.ndarray],
                      seed: int, step: int, cutmix_p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s continuation batch: ``stream_size()`` real samples, then as many synthetic ones
        (uniform indices), optional horizontal flips, then paired CutMix of real ``i`` with synthetic ``i``."""
        rng = step_rng(seed, step)
        half = self.stream_size()
        real_index = rng.integers(0, len(real[0]), size=half)
        synthetic_index = rng.integers(0, len(synthetic[0]), size=half)
        batch_images = np.concatenate([real[0][real_index], synthetic[0][synthetic_index]]).astype(np.float32,
                                                                                                   copy=False)
        batch_masks = np.concatenate([real[1][real_index], synthetic[1][synthetic_index]]).astype(np.int64)
        if self.cfg["augment"]:
            flip = rng.random(2 * half) < 0.5
            batch_images[flip] = batch_images[flip][..., ::-1]
            batch_masks[flip] = batch_masks[flip][..., ::-1]
        if rng.random() < cutmix_p:
            box = cutmix_box(lambda low, high: int(rng.integers(low, high + 1)), batch_masks.shape[1:])
            paired_cutmix(batch_images, batch_masks, half, box)
        return (torch.from_numpy(batch_images).to(self.device),
                torch.from_numpy(batch_masks[:, None]).to(self.device))

    def validation_dice(self, images: np.ndarray, masks: np.ndarray, batch_size: int = 32) -> float:
        """Mean foreground Dice of the argmax prediction (``protocol.mean_foreground_dice``), in eval mode."""
        prediction = self.predict_proba(images, batch_size=batch_size).argmax(axis=1)
        return mean_foreground_dice(prediction, masks, self.num_classes)

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


class _TrainingLoop:
    """What both training loops of :class:`TorchSegmenter` share: AdamW with the config's rate and decay over the
    trainable parameters of the network and the segmenter's ``auxiliary_modules``, the segmenter's loss (MONAI's
    Dice + cross-entropy unless it says otherwise), the checkpointer (network, optimiser, auxiliary modules,
    ``extra`` objects, the float16 loss scale) and one optimisation step under the segmenter's precision
    (segsynth.precision)."""

    def __init__(self, segmenter: "TorchSegmenter", network: torch.nn.Module, checkpoint_dir,
                 extra: dict | None = None):
        cfg = segmenter.cfg
        auxiliary = segmenter.auxiliary_modules()
        for module in (network, *auxiliary.values()):
            module.train()
        self.segmenter, self.network, self.device = segmenter, network, segmenter.device
        trainable = [p for module in (network, *auxiliary.values()) for p in module.parameters() if p.requires_grad]
        self.optimiser = torch.optim.AdamW(trainable, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
        configure(segmenter.precision, segmenter.device)
        self.dtype = compute_dtype(segmenter.precision, segmenter.device, segmenter.cpu_autocast)
        self.scaler = grad_scaler(self.dtype, segmenter.device)
        objects = {"network": network, "optimizer": self.optimiser, **auxiliary, **(extra or {})}
        if self.scaler.is_enabled():
            objects["scaler"] = self.scaler
        self.checkpointer = Checkpointer(checkpoint_dir, int(cfg["checkpoint_every"]), objects)

    def step(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One optimisation step on a batch; ``generator`` is the step's own (segsynth.training.step_torch_generator)
        for losses that draw noise. Returns the loss (on the device: reading it waits for the GPU)."""
        self.optimiser.zero_grad(set_to_none=True)
        with autocast(self.dtype, self.device):
            output = self.segmenter.training_forward(self.network, images, masks, generator)
        loss = self.segmenter.training_loss(output, masks)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimiser)
        self.scaler.update()
        return loss
