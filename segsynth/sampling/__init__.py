"""Synthesis methods: the sampler interface, its registry and the samplers themselves."""

from . import baselines, ddim, vgd  # noqa: F401  (register ddim, vgd, ugdm, tfg, advdiffuser, diffaug, augpaint, gauda)
from .base import SAMPLERS, Sampler, build_sampler

__all__ = ["SAMPLERS", "Sampler", "build_sampler"]
