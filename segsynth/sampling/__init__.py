"""Synthesis methods: the sampler interface, its registry and the samplers themselves."""

from . import baselines, ddim, miner, vgd  # noqa: F401  (register ddim, vgd, miner and the baselines)
from .base import SAMPLERS, Sampler, build_sampler

__all__ = ["SAMPLERS", "Sampler", "build_sampler"]
