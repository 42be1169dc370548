"""The value score of VGD (eqs. 2–3): how much a synthetic sample should teach the downstream segmenter f_θ.

Every sampler records these terms for its final samples, so value distributions can be compared across methods.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """ζ(x) = log cosh x, in the overflow-free form x + softplus(−2x) − log 2."""
    return x + F.softplus(-2.0 * x) - math.log(2.0)


def normalised_cross_entropy(probs: torch.Tensor, masks: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """L_CE of eq. (2) per sample: mean pixel cross-entropy divided by log K, so a uniform prediction scores 1."""
    log_p = torch.log(probs.clamp_min(eps))
    ce = F.nll_loss(log_p, masks.long(), reduction="none").flatten(1).mean(1)
    return ce / math.log(probs.shape[1])


def class_balanced_cross_entropy(probs: torch.Tensor, masks: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per sample: the mean over the classes present in the mask of each class's mean pixel cross-entropy, so
    a small structure weighs as much as the background (the Miner paper's analysis loss)."""
    nll = -torch.log(probs.clamp_min(eps)).gather(1, masks.long().unsqueeze(1)).squeeze(1)
    one_hot = F.one_hot(masks.long(), probs.shape[1]).permute(0, 3, 1, 2).to(nll.dtype)
    pixels = one_hot.flatten(2).sum(2)
    per_class = (one_hot * nll.unsqueeze(1)).flatten(2).sum(2) / pixels.clamp_min(1)
    present = pixels > 0
    return (per_class * present).sum(1) / present.sum(1).clamp_min(1)


def margin_map(probs: torch.Tensor) -> torch.Tensor:
    """1 − (p_top1 − p_top2) per pixel, (B, H, W): the margin uncertainty before the mean of eq. (3)."""
    top2 = probs.topk(2, dim=1).values
    return 1.0 - (top2[:, 0] - top2[:, 1])


def margin_uncertainty(probs: torch.Tensor) -> torch.Tensor:
    """M_s of eq. (3) per sample: mean over pixels of 1 − (p_top1 − p_top2)."""
    return margin_map(probs).flatten(1).mean(1)


def value_terms(probs: torch.Tensor, masks: torch.Tensor, ce_weight: float = 1.0, margin_weight: float = 1.0) -> dict:
    """Per-sample terms of V = ζ(L_CE) + λ·M_s (eq. 2); the weights switch the terms off for ablations.

    ``seg_loss`` is the same cross-entropy before the division by log K: the Miner paper's ℓ_seg.
    ``adversariality`` is 1 − exp(−class-balanced CE) in [0, 1): the scale of the Miner paper's subset
    thresholds τ ∈ {0.3, 0.4, 0.5} (its code's analysis reward)."""
    ce = normalised_cross_entropy(probs, masks)
    margin = margin_uncertainty(probs)
    return {"ce": ce, "margin": margin, "value": ce_weight * log_cosh(ce) + margin_weight * margin,
            "seg_loss": ce * math.log(probs.shape[1]),
            "adversariality": 1.0 - torch.exp(-class_balanced_cross_entropy(probs, masks))}
