"""The sampler interface: every synthesis method (RD, VGD, the Miner, the baselines) implements it."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from ..errors import ConfigError


def sample_generators(noise_seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample, so a sample's noise does not depend on the batch it was drawn in."""
    return [torch.Generator().manual_seed(int(s)) for s in noise_seeds]


class NoiseStream:
    """Per-sample standard normal draws of one shape, in order, on ``device``.

    Each sample's draws come from its own CPU generator, so they are the same numbers on any device and in any
    batch. They are drawn ahead in blocks of ``ahead`` draws and moved to the device once per block: a sampler
    that takes one draw per step then never waits for a host-to-device copy inside its loop. Drawing ahead
    does not change any number: the k-th :meth:`next` of a sample is its generator's k-th draw, as long as
    every consumer of the generators takes its draws through the stream."""

    def __init__(self, noise_seeds: list[int], shape: tuple[int, ...], device, ahead: int = 1):
        self.generators = sample_generators(noise_seeds)
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.ahead = max(1, int(ahead))
        self._block: torch.Tensor | None = None
        self._used = 0

    def _refill(self) -> None:
        per_sample = [torch.stack([torch.randn(self.shape[1:], generator=g) for _ in range(self.ahead)])
                      for g in self.generators]
        block = torch.stack(per_sample, dim=1)  # (ahead, B, ...)
        if self.device.type == "cuda":
            block = block.pin_memory().to(self.device, non_blocking=True)
        self._block, self._used = block, 0

    def next(self) -> torch.Tensor:
        """The next (B, ...) draw: row b is sample b's next draw."""
        if self._block is None or self._used == len(self._block):
            self._refill()
        draw = self._block[self._used]
        self._used += 1
        return draw


def noise_seed(seed: int, sample_index: int) -> int:
    """The seed of one synthetic sample's noise, derived from the synthesis seed and the sample's index."""
    return int(np.random.SeedSequence([seed, sample_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Sampler(ABC):
    """Draws images for a batch of conditioning masks from a frozen generator.

    ``params`` is the method's config entry merged over the synthesis defaults (steps, eta, guidance_scale, …).
    """

    #: whether the sampler uses the frozen downstream segmenter f_θ while sampling
    needs_value_model: bool = False
    #: whether the sampler needs a trained Adversariality Miner (``attach_miner``)
    needs_miner: bool = False

    def __init__(self, params: dict):
        self.params = params

    def choose_sources(self, value_model, images: np.ndarray, masks: np.ndarray, total: int, seed: int,
                       batch_size: int = 16, device="cpu") -> tuple[np.ndarray, dict] | None:
        """For samplers that choose which training masks condition their samples (GAUDA): the ``total`` indices
        and per-sample record columns, from f_θ on the real training ``images`` (in [0, 1]) on ``device``.
        None (every other sampler): the synthesis job's seeded permutations."""
        return None

    @abstractmethod
    def sample(self, generator, masks: torch.Tensor, noise_seeds: list[int], value_model=None,
               source_images: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict]]:
        """Images in [-1, 1], (B, C, H, W), and one dict of sampler-specific record fields per sample.

        ``masks`` (B, H, W) are the conditioning masks; ``source_images`` (B, C, H, W, in [-1, 1]) are the real
        training images those masks belong to, for samplers that edit real images (DiffAug, AugPaint); the
        frozen segmenter f_θ is ``value_model`` (generator-range images → class probabilities)."""


SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(name: str):
    def wrap(cls):
        SAMPLERS[name] = cls
        return cls
    return wrap


def build_sampler(method: str, params: dict) -> Sampler:
    kind = params["sampler"]
    if kind not in SAMPLERS:
        raise ConfigError(f"methods.{method}.sampler", f"unknown sampler {kind!r}; known: {sorted(SAMPLERS)}")
    return SAMPLERS[kind](params)
