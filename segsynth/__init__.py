"""segsynth: a benchmark of utility-guided synthetic data for medical image segmentation."""

__version__ = "0.1.0"
