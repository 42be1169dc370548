"""The downstream training protocols: ``scratch`` (the default) and ``continue``.

``protocol: scratch`` trains a real + synthetic model from a fresh initialisation on the pooled images, exactly
as a real-only model is trained (the behaviour before this key existed).

``protocol: continue`` is the downstream protocol of the Adversariality Miner paper (Native Adversariality
Mining, reference code JackCD99/Native-Adversariality-Mining: ``docs/TABLE1_PROTOCOL.md``,
``nam/downstream/training.py``, ``nam/downstream/{nnunet,swinunet}/train_syn.py``, ``configs/table1_2d.yaml``):

1. the network starts from the real-only model's weights (the rule ``train_segmenter_real``'s output);
2. every batch is half real, half synthetic (two streams of equal size; the reference's
   ``batch_size_per_stream``);
3. paired CutMix with probability ``cutmix_p`` (reference ``cutmix_probability: 0.5``): one Bernoulli draw per
   batch; when it fires, one random box (per spatial axis a side of ``size//4 … 3·size//4`` pixels, uniform,
   at a uniform position) is swapped between the i-th real and the i-th synthetic sample, in the images and
   in the masks alike (``paired_cutmix`` of the reference);
4. a validation split carved from the real training split by case (``val_fraction`` of the cases, the same
   cases for every run of a dataset); training uses the rest of the real cases;
5. validation every ``val_every`` steps (torch) / epochs (nnU-Net) and at the end; the checkpoint with the best
   mean validation Dice is the saved model (reference: ``best.pt``, first maximum wins).

Config keys (every registry kind): ``protocol`` (scratch | continue), ``continue_steps`` (torch segmenters) /
``continue_epochs`` (nnU-Net), ``val_fraction``, ``val_every``, ``cutmix_p``. The real-only model ignores all of
them: they only change real + synthetic training.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

PROTOCOLS = ("scratch", "continue")
DEFAULT_PROTOCOL = "scratch"
#: keys of the protocol in a torch segmenter's / nnU-Net's config entry
TORCH_PROTOCOL_KEYS = ("protocol", "continue_steps", "val_fraction", "val_every", "cutmix_p")
NNUNET_PROTOCOL_KEYS = ("protocol", "continue_epochs", "val_fraction", "val_every", "cutmix_p")
PROTOCOL_KEYS = tuple(dict.fromkeys(TORCH_PROTOCOL_KEYS + NNUNET_PROTOCOL_KEYS))

#: Paired CutMix probability: TABLE1_PROTOCOL.md ("paired CutMix with probability 0.5") and every
#: ``synthetic_training.cutmix_probability: 0.5`` of configs/table1_2d.yaml.
DEFAULT_CUTMIX_P = 0.5
#: Validation share of the real training cases: the reference's splits (nam/data/SPLITS.md, Table C.1 of the
#: supplement) are train : validation : test = 70 : 10 : 20, so validation is 10 / 80 of the non-test cases
#: (ACDC 572 / 4582, Polyps 161 / 1289).
DEFAULT_VAL_FRACTION = 0.125
#: The validation cases do not depend on the run's seed: the same cases for every run of a dataset (SPLITS.md:
#: missing validation partitions "were generated deterministically with seed 42").
VAL_SPLIT_SEED = 42
#: Continuation budget when ``continue_steps`` / ``continue_epochs`` is not set: a tenth of the scratch budget.
#: The reference says so for nnU-Net only (configs/table1_2d.yaml: ``real_training.epochs: 1000``,
#: ``synthetic_training.epochs: 100``, 250 iterations per epoch in both). For the torch segmenters it has no
#: direct counterpart (its Swin-Unet continues 100 epochs of 4 + 4 images after 150 epochs of 24), so the same
#: 10 % is an assumption (as segsynth.plan's CONTINUE_FRACTION).
CONTINUE_FRACTION = 0.1


def protocol_of(cfg: dict) -> str:
    """The segmenter entry's protocol (default ``scratch``), checked."""
    protocol = cfg.get("protocol", DEFAULT_PROTOCOL)
    if protocol is None:
        protocol = DEFAULT_PROTOCOL
    if protocol not in PROTOCOLS:
        raise ConfigError("segmenters.protocol", f"must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


@dataclass(frozen=True)
class ContinueOptions:
    """The continuation settings of one segmenter entry; ``budget`` in steps (torch) or epochs (nnU-Net);
    ``val_every`` None = once per pass over the real training cases (torch only; the reference's every epoch)."""

    budget: int
    val_fraction: float
    val_every: int | None
    cutmix_p: float


def _int(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"segmenters.{key}", f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _fraction(key: str, value, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"segmenters.{key}", f"must be a number, got {value!r}")
    value = float(value)
    if (value <= 0 if low_open else value < 0) or (value >= 1 if high_open else value > 1):
        raise ConfigError(f"segmenters.{key}", f"must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, "
                          f"got {value!r}")
    return value


def continue_options(cfg: dict, budget_key: str, scratch_budget: int, default_val_every: int | None) -> ContinueOptions:
    """Read and check the continuation keys of ``cfg``; ``budget_key`` is ``continue_steps`` or
    ``continue_epochs`` and defaults to ``CONTINUE_FRACTION`` of ``scratch_budget`` (at least 1)."""
    budget = cfg.get(budget_key)
    budget = (max(1, math.ceil(CONTINUE_FRACTION * int(scratch_budget))) if budget is None
              else _int(budget_key, budget, 0))
    val_every = cfg.get("val_every", default_val_every)
    val_every = None if val_every is None else _int("val_every", val_every, 1)
    return ContinueOptions(
        budget=budget,
        val_fraction=_fraction("val_fraction", cfg.get("val_fraction", DEFAULT_VAL_FRACTION), True, True),
        val_every=val_every,
        cutmix_p=_fraction("cutmix_p", cfg.get("cutmix_p", DEFAULT_CUTMIX_P), False, False),
    )


def validation_cases(case_ids, val_fraction: float) -> set[str]:
    """The real training cases kept for validation: ``round(n · val_fraction)`` of the ``n`` distinct case ids
    (at least one, and at least one left for training), by a fixed-seed permutation of the sorted ids, so
    every run of a dataset validates on the same cases whatever its seed or the order of its rows."""
    from ..data.splits import case_split

    cases = sorted({str(c) for c in case_ids})
    if len(cases) < 2:
        raise ConfigError("segmenters.val_fraction", f"protocol continue carves validation cases from the real "
                          f"training split, which has {len(cases)} case(s): at least 2 are needed")
    split = case_split(cases, val_fraction, seed=VAL_SPLIT_SEED)
    return {case for case, side in split.items() if side == "test"}


# --- batches ----------------------------------------------------------------------------------------


def cutmix_box(draw_int, spatial: tuple[int, ...]) -> tuple[slice, ...]:
    """One CutMix box over the ``spatial`` sizes: per axis a side drawn uniformly from
    ``max(1, size//4) … max(1, 3·size//4)`` and a start uniformly from ``0 … size - side`` (bounds inclusive,
    the reference's ``random.randint``). ``draw_int(low, high)`` draws an integer in ``[low, high]``."""
    box = []
    for size in spatial:
        side = draw_int(max(1, size // 4), max(1, 3 * size // 4))
        start = draw_int(0, max(size - side, 0))
        box.append(slice(start, start + side))
    return tuple(box)


def swap_box(x, half: int, box: tuple[slice, ...]):
    """Swap the ``box`` region (the last ``len(box)`` axes) between row ``i`` and row ``half + i`` of ``x``, for
    every ``i < half``, in place (a numpy array or a torch tensor: images and masks of a paired batch)."""
    index_a = (slice(0, half), Ellipsis, *box)
    index_b = (slice(half, 2 * half), Ellipsis, *box)
    first = x[index_a]
    first = first.copy() if isinstance(first, np.ndarray) else first.clone()
    x[index_a] = x[index_b]
    x[index_b] = first
    return x


def paired_cutmix(images, masks, half: int, box: tuple[slice, ...]) -> None:
    """CutMix of a paired batch (rows ``0 … half-1`` real, ``half … 2·half-1`` synthetic), in place: the same box
    of image and mask is exchanged between each real sample and its synthetic partner."""
    swap_box(images, half, box)
    swap_box(masks, half, box)


# --- validation ------------------------------------------------------------------------------------------


def mean_foreground_dice(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Checkpoint-selection Dice (the reference's ``mean_foreground_dice``): the mean over every (sample,
    foreground class) pair where the prediction or the truth has the class, of that pair's Dice; 0 when no
    pair has any foreground."""
    prediction = np.asarray(prediction)
    truth = np.asarray(truth)
    values = []
    for k in range(1, num_classes):
        p, t = prediction == k, truth == k
        axes = tuple(range(1, p.ndim))
        intersection = (p & t).sum(axis=axes)
        denominator = p.sum(axis=axes) + t.sum(axis=axes)
        present = denominator > 0
        values.append(2.0 * intersection[present] / denominator[present])
    values = np.concatenate(values) if values else np.zeros(0)
    return float(values.mean()) if values.size else 0.0


class BestCheckpoint:
    """The best weights seen at validation so far (first maximum wins), with the validation history; it has
    ``state_dict`` / ``load_state_dict`` so that a ``segsynth.training.Checkpointer`` saves and resumes it."""

    def __init__(self):
        self.dice: float | None = None
        self.step: int | None = None
        self.weights: dict | None = None
        self.history: list[tuple[int, float]] = []

    def offer(self, step: int, dice: float, network) -> bool:
        """Record a validation; keep a copy of ``network``'s weights when ``dice`` beats the best. True if kept."""
        self.history.append((int(step), float(dice)))
        if self.dice is not None and not dice > self.dice:
            return False
        self.dice, self.step = float(dice), int(step)
        self.weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
        return True

    def state_dict(self) -> dict:
        return {"dice": self.dice, "step": self.step, "weights": self.weights, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.dice, self.step = state["dice"], state["step"]
        self.weights = copy.copy(state["weights"])
        self.history = [(int(s), float(d)) for s, d in state["history"]]
