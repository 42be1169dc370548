"""Deterministic train/test splits that keep correlated samples on one side.

Neighbouring slices of a volume are nearly identical, so a per-slice random split would put
near-copies of test slices into training. :func:`slab_split` therefore splits contiguous slabs and
drops the slices at each train/test boundary; :func:`case_split` splits whole cases (patients,
files) for 2D sources.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np


class SlabSlice(NamedTuple):
    """One kept slice: its position in the stack, the slab it belongs to, and that slab's split."""

    position: int
    slab: int
    split: str


def slab_is_test(slab: int, test_fraction: float) -> bool:
    """Whether slab ``slab`` goes to test: every slab where ``floor(i * f)`` steps up.

    This spreads the test slabs evenly through the stack (each region of the anatomy is represented
    in both splits) and puts ``floor(n_slabs * f)`` of ``n_slabs`` slabs into test.
    """
    return math.floor((slab + 1) * test_fraction) > math.floor(slab * test_fraction)


def slab_split(n_slices: int, test_fraction: float, slab_size: int, gap: int) -> list[SlabSlice]:
    """Split positions ``0..n_slices-1`` into contiguous slabs of ``slab_size`` and assign each a split.

    At every boundary between a train slab and a test slab, the ``gap`` train slices nearest the
    boundary are dropped (absent from the result), so no test slice has a training neighbour
    closer than ``gap + 1`` positions. The slices are taken from the train side so the test
    fraction stays near ``test_fraction``. Raises ``ValueError`` if either split would be empty.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if slab_size < 1 or gap < 0:
        raise ValueError(f"need slab_size >= 1 and gap >= 0, got slab_size={slab_size}, gap={gap}")
    slabs = [position // slab_size for position in range(n_slices)]
    n_slabs = slabs[-1] + 1 if slabs else 0
    is_test = [slab_is_test(slab, test_fraction) for slab in range(n_slabs)]
    if all(is_test) or not any(is_test):
        raise ValueError(
            f"{n_slices} slices in {n_slabs} slabs of {slab_size} give no "
            f"{'train' if all(is_test) else 'test'} slab at test_fraction {test_fraction}; use smaller slabs"
        )
    test_positions = [p for p in range(n_slices) if is_test[slabs[p]]]
    kept = []
    for position in range(n_slices):
        slab = slabs[position]
        if not is_test[slab] and any(abs(position - t) <= gap for t in test_positions):
            continue
        kept.append(SlabSlice(position, slab, "test" if is_test[slab] else "train"))
    if not any(s.split == "train" for s in kept):
        raise ValueError(f"gap={gap} drops every training slice; use a smaller gap or larger slabs")
    return kept


def case_split(case_ids: Iterable[str], test_fraction: float, seed: int) -> dict[str, str]:
    """Assign each distinct case to "train" or "test" by a seeded permutation of the sorted ids.

    Sorting first makes the result independent of the order the cases were listed in; the test
    count is ``round(n * test_fraction)`` clamped so that both splits get at least one case.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    cases = sorted(set(case_ids))
    if len(cases) < 2:
        raise ValueError(f"need at least 2 cases to split, got {len(cases)}")
    n_test = min(max(round(len(cases) * test_fraction), 1), len(cases) - 1)
    order = np.random.default_rng(seed).permutation(len(cases))
    test = {cases[i] for i in order[:n_test]}
    return {case: "test" if case in test else "train" for case in cases}
