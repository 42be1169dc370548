"""The mask-to-image generator: model, loading and fine-tuning."""

from .model import MaskToImageGenerator, build_generator

__all__ = ["MaskToImageGenerator", "build_generator"]
