"""Downstream segmenters: the registry of kinds, loading a saved model, and the training entry point.

A config entry names its segmenter by ``kind``; ``SEGMENTERS`` maps each kind to the class that
trains, saves and reloads it, so adding a network family is one class plus one line here.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

from ..config import science, weight_sources
from ..errors import ConfigError, InputDataError
from ..training import claim_checkpoint_dir, inputs_fingerprint, releases_unused_claims, set_torch_threads
from .base import (STATS_FILE, Segmenter, SyntheticSet, TorchSegmenter, load_synthetic_set,
                   read_model_meta)
from .leaf import LEAF
from .lightweight import ORDER, MKUNet
from .monai_nets import MonaiBasicUNet, MonaiUNet
from .nnunet import NnUNetSegmenter
from .protocol import PROTOCOL_KEYS, protocol_of, validation_cases
from .swin_unet import SwinUNet

__all__ = [
    "SEGMENTERS", "Segmenter", "TorchSegmenter", "SyntheticSet", "MonaiUNet", "MonaiBasicUNet", "MKUNet", "ORDER",
    "SwinUNet", "NnUNetSegmenter", "LEAF",
    "get_segmenter_class", "load_segmenter", "load_synthetic_set", "train_segmenter", "STATS_FILE",
    "PROTOCOL_KEYS", "protocol_of", "validation_cases", "real_only_settings",
]

log = logging.getLogger(__name__)

SEGMENTERS: dict[str, type[Segmenter]] = {cls.kind: cls for cls in (MonaiUNet, MonaiBasicUNet, MKUNet, ORDER, SwinUNet,
                                                                    NnUNetSegmenter, LEAF)}


def get_segmenter_class(kind: str) -> type[Segmenter]:
    try:
        return SEGMENTERS[kind]
    except KeyError:
        raise ConfigError("segmenters.kind", f"unknown segmenter kind '{kind}'; known: {sorted(SEGMENTERS)}") from None


def load_segmenter(model_dir) -> Segmenter:
    """Load a saved model of any registered kind (the kind is read from its ``meta.json``)."""
    return get_segmenter_class(read_model_meta(model_dir)["kind"]).load(model_dir)


def real_only_settings(entry: dict) -> dict:
    """A segmenter entry without its protocol keys: what a real-only model depends on (the protocol only
    changes real + synthetic training, so editing it never retrains the Baseline or f_θ)."""
    return {key: value for key, value in entry.items() if key not in PROTOCOL_KEYS}


@releases_unused_claims
def train_segmenter(cfg: dict, data_dir, out_dir, seed: int, synthetic_dirs: Iterable = (),
                    checkpoint_dir=None, threads: int = 1, precision: str = "fp32", init_dir=None,
                    include_real: bool = True) -> None:
    """Train one segmenter on the real training split and the given synthetic sets.

    ``include_real=False`` trains on the synthetic sets alone, from scratch whatever the protocol (the LAW
    paper's test of a generator: how well a segmenter learns from its images only).

    ``protocol: scratch`` (the default): a fresh network on the real training split pooled with the synthetic
    sets. ``protocol: continue`` with synthetic sets: start from the real-only model ``init_dir`` and continue on
    1:1 real:synthetic batches with paired CutMix, validating on cases carved from the real training split
    (``validation_cases``) and saving the best-validated weights (segsynth.segmenters.protocol). Without
    synthetic sets (the real-only model) the protocol does not apply.

    Writes the model directory ``out_dir`` (with ``train_stats.json``) atomically. Progress is
    checkpointed in ``checkpoint_dir`` (default ``<out_dir>.ckpt``), so a killed job resumes where it
    stopped; the checkpoints are deleted once the model is saved. ``precision`` (segsynth.precision) is the
    autocast setting of the registry's PyTorch trainers (nnU-Net runs its own mixed precision on a GPU).
    """
    from ..data.canonical import load_split, read_meta

    set_torch_threads(threads)
    out_dir = Path(out_dir)
    synthetic_dirs = [Path(d) for d in synthetic_dirs]
    checkpoint_dir = claim_checkpoint_dir(
        checkpoint_dir if checkpoint_dir is not None else out_dir.with_name(out_dir.name + ".ckpt"),
        {"trainer": "segmenter", "cfg": science("segmenter", cfg), "seed": seed, "precision": precision,
         "include_real": include_real,
         "inputs": inputs_fingerprint([data_dir, init_dir, *synthetic_dirs, *weight_sources(cfg)])})
    protocol = protocol_of(cfg)
    if init_dir is not None and protocol != "continue":
        raise ConfigError("segmenters.protocol", f"an initial model ({init_dir}) is only used by protocol 'continue', "
                          f"this segmenter's is '{protocol}'")
    if not include_real:
        if not synthetic_dirs:
            raise ConfigError("segmenters", "a synthetic-only segmenter needs at least one synthetic set")
        if init_dir is not None:
            raise ConfigError("segmenters.protocol", "a synthetic-only segmenter trains from scratch, without "
                              f"an initial model ({init_dir})")
        protocol = "scratch"
    continuing = protocol == "continue" and bool(synthetic_dirs)
    if continuing and init_dir is None:
        raise ConfigError("segmenters.protocol",
                          "protocol 'continue' needs the real-only model (init_dir) to start from")
    if init_dir is not None and not synthetic_dirs:
        raise ConfigError("segmenters.protocol", "protocol 'continue' needs at least one synthetic set")
    class_names = read_meta(data_dir)["class_names"]
    real = load_split(data_dir, "train")
    synthetic = [_checked_synthetic_set(d, real.images.shape[1:], len(class_names)) for d in synthetic_dirs]
    if continuing:
        _train_continue(cfg, real, synthetic, class_names, out_dir, checkpoint_dir, seed, precision,
                        Path(init_dir), synthetic_dirs)
        return
    n_real = len(real.images) if include_real else 0
    images = np.concatenate([real.images[:n_real], *(s.images for s in synthetic)])
    masks = np.concatenate([real.masks[:n_real], *(s.masks for s in synthetic)])

    segmenter = get_segmenter_class(cfg["kind"])(cfg, images.shape[1], len(class_names), class_names)
    segmenter.precision = precision
    stats = segmenter.train(images, masks, checkpoint_dir, seed, synthetic_from=n_real)
    stats.update(seed=int(seed), n_real=int(n_real), n_synthetic=int(len(images) - n_real),
                 synthetic_dirs=[str(d) for d in synthetic_dirs])
    segmenter.save(out_dir, train_stats=stats)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info("trained %s (seed %d) on %d real + %d synthetic samples in %.0f s", cfg["kind"], seed,
             stats["n_real"], stats["n_synthetic"], stats["seconds"])


def _train_continue(cfg: dict, real, synthetic: list, class_names: list, out_dir: Path, checkpoint_dir: Path,
                    seed: int, precision: str, init_dir: Path, synthetic_dirs: list) -> None:
    """``train_segmenter`` for protocol continue: carve the validation cases, train, save the best model."""
    segmenter = get_segmenter_class(cfg["kind"])(cfg, real.images.shape[1], len(class_names), class_names)
    segmenter.precision = precision
    val_fraction = segmenter.continue_options(len(real.images)).val_fraction
    case_ids = real.index["case_id"].astype(str).to_numpy()
    val_cases = validation_cases(case_ids, val_fraction)
    is_val = np.isin(case_ids, sorted(val_cases))
    synthetic_images = np.concatenate([s.images for s in synthetic])
    synthetic_masks = np.concatenate([s.masks for s in synthetic])
    stats = segmenter.train_continue((real.images[~is_val], real.masks[~is_val]), (synthetic_images, synthetic_masks),
                                     (real.images[is_val], real.masks[is_val]), init_dir, checkpoint_dir, seed)
    stats.update(seed=int(seed), n_real=int((~is_val).sum()), n_synthetic=int(len(synthetic_images)),
                 synthetic_dirs=[str(d) for d in synthetic_dirs], init_dir=str(init_dir),
                 val_fraction=val_fraction, val_cases=sorted(val_cases))
    segmenter.save(out_dir, train_stats=stats)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info("continued %s (seed %d) from %s on %d real + %d synthetic samples, validated on %d cases; best "
             "validation Dice %s at step %s, %.0f s", cfg["kind"], seed, init_dir, stats["n_real"],
             stats["n_synthetic"], len(val_cases), stats.get("best_val_dice"), stats.get("best_step"),
             stats["seconds"])


def _checked_synthetic_set(directory, image_shape: tuple, num_classes: int) -> SyntheticSet:
    """A synthetic set that can be pooled with the real images: same channels, resolution, classes."""
    synthetic = load_synthetic_set(directory)
    if synthetic.images.shape[1:] != tuple(image_shape):
        raise InputDataError(Path(directory) / "images.npy",
                             f"sample shape {synthetic.images.shape[1:]} differs from the real {tuple(image_shape)}")
    if synthetic.masks.size and int(synthetic.masks.max()) >= num_classes:
        raise InputDataError(Path(directory) / "masks.npy",
                             f"class index {int(synthetic.masks.max())} but the dataset has {num_classes} classes")
    return synthetic
