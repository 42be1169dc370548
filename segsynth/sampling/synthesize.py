"""One synthesis job: (dataset, generator, method, seed) → a synthetic set of image–mask pairs on disk.

The set holds ``budget × |train|`` pairs whose masks are the training masks (each used once per budget unit, in
an order fixed by the seed). Output directory: ``images.npy`` (N, C, H, W) float32 in [0, 1], ``masks.npy``
(N, H, W) uint8, ``records.parquet`` (one row per sample: ids, seeds, and the value-score terms of its final
image under the frozen real-only segmenter f_θ) and ``meta.json``. Written atomically.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data.canonical import load_split
from ..generator import MaskToImageGenerator
from ..config import science
from ..precision import autocast, compute_dtype, configure
from ..io import atomic_dir, json_value, read_json, save_array, write_json, write_parquet
from ..mask_sources import MASK_SOURCES, augment_pairs, augment_seed
from ..mask_vae import class_presence, cvae_seed
from ..training import (claim_checkpoint_dir, default_device, inputs_fingerprint, releases_unused_claims,
                        set_torch_threads)
from .base import build_sampler, noise_seed
from .value import value_terms

log = logging.getLogger(__name__)


def conditioning_sources(n_train: int, budget: float, seed: int) -> np.ndarray:
    """Indices of the training masks that condition the synthetic samples: whole seeded permutations,
    cut to ``round(budget × n_train)``."""
    total = int(round(budget * n_train))
    rng = np.random.default_rng([seed, 0xC0DE])
    rounds = -(-total // n_train)
    return np.concatenate([rng.permutation(n_train) for _ in range(rounds)])[:total]


@releases_unused_claims
def synthesize(generator_dir, data_dir, method: str, params: dict, seed: int, out_dir, value_model_dir=None,
               threads: int = 1, miner_dir=None, checkpoint_dir=None, stop_after: int | None = None,
               precision: str = "fp32", cpu_autocast: bool = False, candidates_dir=None,
               mask_vae_dir=None) -> pd.DataFrame:
    """Run the sampler of ``method`` and write the synthetic set to ``out_dir``; returns its records.

    Every batch is written as a shard to ``checkpoint_dir`` (default ``<out_dir>.ckpt``) as soon as it is
    sampled, so a killed job resumes at the first sample no shard holds; a sample depends on its seed alone,
    so the resumed set is the set an uninterrupted job writes. Shards of another job (other settings or other
    models) are discarded. ``stop_after`` ends the job after that many batches of this attempt, leaving the
    shards and no output (tests simulate a kill with it). ``precision`` (segsynth.precision; float32 on a CPU
    unless ``cpu_autocast``): the frozen generator in the reduced dtype, sampling and guidance under autocast.
    ``candidates_dir``: a synthetic set whose images are GAUDA's first candidates by construction (the run's RD
    set with the same settings and seed, ``segsynth.config.candidate_source``); they are read, not sampled.
    ``mask_vae_dir``: the trained p_ω(m | c) of a method with ``mask_source: cvae`` (segsynth.mask_vae)."""
    set_torch_threads(threads)
    device = default_device()
    configure(precision, device)
    dtype = compute_dtype(precision, device, cpu_autocast)
    generator = MaskToImageGenerator.load(generator_dir).to(device, dtype)
    sampler = build_sampler(method, params)
    value_model = None
    if value_model_dir is not None:
        from ..segmenters import load_segmenter
        value_model = load_segmenter(value_model_dir).as_value_model().to(device)
    elif sampler.needs_value_model:
        raise ValueError(f"method {method!r} needs the frozen segmenter f_θ (value_model_dir)")
    if sampler.needs_miner:
        if miner_dir is None:
            raise ValueError(f"method {method!r} needs a trained Adversariality Miner (miner_dir)")
        from ..miner import AdversarialityMiner
        sampler.attach_miner(AdversarialityMiner.load(miner_dir).to(device))

    train = load_split(data_dir, "train")
    sources = conditioning_sources(len(train.masks), params["budget"], seed)
    chosen = None
    if value_model is not None:  # GAUDA picks its masks from f_θ's uncertainty on the real training images
        chosen = sampler.choose_sources(value_model, train.images, train.masks, len(sources), seed,
                                        params["batch_size"], device)
    source_columns = {}
    if chosen is not None:
        sources, source_columns = chosen
    candidates = None
    if candidates_dir is not None:
        candidates = _first_candidates(candidates_dir, train.index["sample_id"].to_numpy()[sources])
    mask_source = params.get("mask_source", "gt")
    if mask_source not in MASK_SOURCES:
        raise ValueError(f"method {method!r}: unknown mask_source {mask_source!r} (known: {list(MASK_SOURCES)})")
    mask_vae = None
    if mask_source == "cvae":
        if mask_vae_dir is None:
            raise ValueError(f"method {method!r} draws its masks from the mask VAE (mask_vae_dir)")
        from ..mask_vae import ConditionalMaskVAE
        mask_vae = ConditionalMaskVAE.load(mask_vae_dir)

    def conditioning(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(masks, real images in [0, 1]) conditioning the samples ``idx``: the training pairs, deformed per
        sample for ``gt_aug``, drawn from the mask VAE for ``cvae`` (segsynth.mask_sources)."""
        masks, images = train.masks[sources[idx]], train.images[sources[idx]]
        if mask_source == "cvae":
            masks = mask_vae.sample(class_presence(masks, mask_vae.config["num_classes"]),
                                    [cvae_seed(seed, int(i)) for i in idx])
        elif mask_source == "gt_aug":
            images, masks = augment_pairs(images, masks, [augment_seed(seed, int(i)) for i in idx],
                                          params.get("mask_augment"))
        return np.ascontiguousarray(masks), np.ascontiguousarray(images)

    job = {"method": method, "params": science("synthesis", params), "seed": seed, "n": len(sources),
           "precision": str(dtype),
           "inputs": inputs_fingerprint([generator_dir, data_dir, value_model_dir, miner_dir, candidates_dir]
                                         + ([mask_vae_dir] if mask_vae_dir is not None else []))}
    shards = ShardStore(checkpoint_dir or f"{out_dir}.ckpt", job)
    batch = params["batch_size"]
    done = shards.done()
    if done:
        log.info("%s seed %d: resuming at sample %d of %d (shards in %s)", method, seed, done, len(sources),
                 shards.directory)
    for count, begin in enumerate(tqdm(range(done, len(sources), batch), desc=f"{method} seed {seed}",
                                       mininterval=10)):
        if stop_after is not None and count >= stop_after:
            return pd.DataFrame()
        began = time.time()
        idx = np.arange(begin, min(begin + batch, len(sources)))
        batch_masks, batch_images = conditioning(idx)
        masks = torch.from_numpy(batch_masks).to(device)
        source_images = torch.from_numpy(batch_images).to(device) * 2 - 1
        if candidates is not None:
            sampler.first_candidates = torch.from_numpy(candidates[idx]).to(device) * 2 - 1
        with autocast(dtype, device):
            x, extra = sampler.sample(generator, masks, [noise_seed(seed, int(i)) for i in idx], value_model,
                                      source_images)
            x = x.float()
            if value_model is not None:
                with torch.no_grad():
                    terms = {k: v.tolist() for k, v in value_terms(value_model(x), masks).items()}
        if value_model is not None:
            for j, row in enumerate(extra):
                row.update({k: v[j] for k, v in terms.items()})
        images = ((x.detach() + 1) / 2).clamp(0, 1).cpu().numpy().astype(np.float32)
        shards.write(int(idx[0]), images, extra, time.time() - began)

    images, records, seconds = shards.read()
    frame = pd.DataFrame(records)
    frame.insert(0, "sample_id", [f"{method}_seed{seed}_{i:05d}" for i in range(len(sources))])
    frame.insert(1, "source_sample_id", train.index["sample_id"].to_numpy()[sources])
    frame.insert(2, "method", method)
    frame.insert(3, "seed", seed)
    for column, values in source_columns.items():
        frame[column] = values
    with atomic_dir(out_dir) as tmp:
        save_array(tmp / "images.npy", images)
        save_array(tmp / "masks.npy", conditioning(np.arange(len(sources)))[0].astype(np.uint8))
        write_parquet(tmp / "records.parquet", frame)
        write_json(tmp / "meta.json", {"method": method, "params": params, "seed": seed, "n": len(sources),
                                       "seconds": round(seconds, 2),
                                       "seconds_per_image": round(seconds / max(1, len(sources)), 4)})
    shards.remove()
    log.info("%s seed %d: %d samples in %.1f s of sampling", method, seed, len(sources), seconds)
    return frame


def _first_candidates(directory, source_ids: np.ndarray) -> np.ndarray:
    """The images of the synthetic set ``directory``, checked to be conditioned on the same masks in order."""
    from ..errors import InputDataError
    from ..synthetic_set import load_synthetic_set

    reused = load_synthetic_set(directory)
    if not np.array_equal(reused.records["source_sample_id"].to_numpy(), source_ids):
        raise InputDataError(Path(directory) / "records.parquet",
                             "its samples are not conditioned on this job's masks in this job's order")
    return reused.images


class ShardStore:
    """The per-batch shards of one synthesis job: ``batch_<first sample>.npy`` (images) and ``.json`` (records,
    sampling seconds), each written atomically, the JSON last, so a shard counts once its JSON exists.
    ``job.json`` names the job; a store that belongs to another job is emptied on opening
    (``segsynth.training.claim_checkpoint_dir``)."""

    def __init__(self, directory, job: dict):
        self.directory = claim_checkpoint_dir(directory, job)
        self.job = json_value(job)

    def _shards(self) -> list[dict]:
        shards = [read_json(p) for p in sorted(self.directory.glob("batch_*.json"))]
        return sorted(shards, key=lambda shard: shard["start"])

    def done(self) -> int:
        """The number of leading samples the shards hold without a gap."""
        end = 0
        for shard in self._shards():
            if shard["start"] != end:
                break
            end = shard["start"] + len(shard["records"])
        return end

    def write(self, start: int, images: np.ndarray, records: list[dict], seconds: float) -> None:
        save_array(self.directory / f"batch_{start:07d}.npy", images)
        write_json(self.directory / f"batch_{start:07d}.json",
                   {"start": start, "records": records, "seconds": seconds})

    def read(self) -> tuple[np.ndarray, list[dict], float]:
        """(images, records, sampling seconds) of the leading shards, in sample order."""
        images, records, seconds, end = [], [], 0.0, 0
        for shard in self._shards():
            if shard["start"] != end:
                break
            images.append(np.load(self.directory / f"batch_{shard['start']:07d}.npy"))
            records.extend(shard["records"])
            seconds += shard["seconds"]
            end += len(shard["records"])
        if end != self.job["n"]:
            raise RuntimeError(f"{self.directory}: shards hold {end} of {self.job['n']} samples")
        return np.concatenate(images), records, seconds

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
