"""One synthesis job: (dataset, generator, method, seed) → a synthetic set of image–mask pairs on disk.

The set holds ``budget × |train|`` pairs whose masks are the training masks (each used once per budget unit, in
an order fixed by the seed). Output directory: ``images.npy`` (N, C, H, W) float32 in [0, 1], ``masks.npy``
(N, H, W) uint8, ``records.parquet`` (one row per sample: ids, seeds, and the value-score terms of its final
image under the frozen real-only segmenter f_θ) and ``meta.json``. Written atomically.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data.canonical import load_split
from ..generator import MaskToImageGenerator
from ..io import atomic_dir, save_array, write_json, write_parquet
from ..training import default_device, set_torch_threads
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


def synthesize(generator_dir, data_dir, method: str, params: dict, seed: int, out_dir, value_model_dir=None,
               threads: int = 1, miner_dir=None) -> pd.DataFrame:
    """Run the sampler of ``method`` and write the synthetic set to ``out_dir``; returns its records."""
    set_torch_threads(threads)
    device = default_device()
    generator = MaskToImageGenerator.load(generator_dir).to(device)
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
    batch = params["batch_size"]
    images, records = [], []
    began = time.time()
    for start in tqdm(range(0, len(sources), batch), desc=f"{method} seed {seed}", mininterval=10):
        idx = np.arange(start, min(start + batch, len(sources)))
        masks = torch.from_numpy(np.ascontiguousarray(train.masks[sources[idx]])).to(device)
        source_images = torch.from_numpy(np.ascontiguousarray(train.images[sources[idx]])).to(device) * 2 - 1
        x, extra = sampler.sample(generator, masks, [noise_seed(seed, int(i)) for i in idx], value_model,
                                  source_images)
        if value_model is not None:
            with torch.no_grad():
                terms = value_terms(value_model(x), masks)
            for row, j in zip(extra, range(len(idx))):
                row.update({k: float(v[j]) for k, v in terms.items()})
        images.append(((x.detach() + 1) / 2).clamp(0, 1).cpu().numpy().astype(np.float32))
        records.extend(extra)
    seconds = time.time() - began

    frame = pd.DataFrame(records)
    frame.insert(0, "sample_id", [f"{method}_seed{seed}_{i:05d}" for i in range(len(sources))])
    frame.insert(1, "source_sample_id", train.index["sample_id"].to_numpy()[sources])
    frame.insert(2, "method", method)
    frame.insert(3, "seed", seed)
    with atomic_dir(out_dir) as tmp:
        save_array(tmp / "images.npy", np.concatenate(images))
        save_array(tmp / "masks.npy", train.masks[sources].astype(np.uint8))
        write_parquet(tmp / "records.parquet", frame)
        write_json(tmp / "meta.json", {"method": method, "params": params, "seed": seed, "n": len(sources),
                                       "seconds": round(seconds, 2),
                                       "seconds_per_image": round(seconds / max(1, len(sources)), 4)})
    log.info("%s seed %d: %d samples in %.1f s", method, seed, len(sources), seconds)
    return frame
