"""Dispatch from a dataset's config ``kind`` to the adapter that reads that kind of source.

An adapter is ``function(name, cfg) -> (images, masks, index, meta)`` with the index lacking the
``pixels_*`` columns; it only reads and converts, and :func:`prepare_dataset` hands its output to
:func:`segsynth.data.canonical.write_canonical`, which validates and writes it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from segsynth.data.acdc import build_acdc
from segsynth.data.canonical import write_canonical
from segsynth.data.folder import build_folder
from segsynth.data.mni152 import build_mni152
from segsynth.data.nnunet_raw import build_nnunet_raw
from segsynth.data.synapse import build_synapse
from segsynth.errors import ConfigError

Adapter = Callable[[str, dict], tuple[np.ndarray, np.ndarray, pd.DataFrame, dict]]

ADAPTERS: dict[str, Adapter] = {
    "mni152": build_mni152,
    "folder": build_folder,
    "acdc": build_acdc,
    "synapse": build_synapse,
    "nnunet_raw": build_nnunet_raw,
}


def prepare_dataset(name: str, cfg: dict, out_dir) -> None:
    """Build dataset ``name`` from its config entry and write it in the canonical format to ``out_dir``."""
    kind = cfg.get("kind")
    if kind not in ADAPTERS:
        raise ConfigError(f"datasets.{name}.kind", f"must be one of {sorted(ADAPTERS)}, got {kind!r}")
    images, masks, index, meta = ADAPTERS[kind](name, cfg)
    write_canonical(out_dir, images, masks, index, meta)
