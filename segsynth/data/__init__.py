"""Datasets: source adapters, leakage-free splits, and the canonical on-disk format all stages read.

Only the light canonical-format API is imported here; adapters live in
:mod:`segsynth.data.adapters`, so stages that just load a prepared dataset need neither PIL decoding
nor nilearn/MONAI.
"""

from segsynth.data.canonical import FORMAT_VERSION, SplitData, load_split, read_meta, write_canonical

__all__ = ["FORMAT_VERSION", "SplitData", "load_split", "read_meta", "write_canonical"]
