"""The sampler interface: every synthesis method (RD, VGD, the Miner, the baselines) implements it."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from ..errors import ConfigError


def sample_generators(noise_seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample, so a sample's noise does not depend on the batch it was drawn in."""
    return [torch.Generator().manual_seed(int(s)) for s in noise_seeds]


def per_sample_randn(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """A (B, ...) standard normal tensor whose row b comes from ``generators[b]``."""
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generators])


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
