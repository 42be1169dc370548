"""Synthesis methods: the sampler interface, its registry and the samplers themselves."""

from . import ddim  # noqa: F401  (registers "ddim")
from .base import SAMPLERS, Sampler, build_sampler

__all__ = ["SAMPLERS", "Sampler", "build_sampler"]
