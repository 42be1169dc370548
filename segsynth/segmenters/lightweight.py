"""Ultra-lightweight CNN segmenters: MK-UNet and ORDER (MK-UNet + selective bidirectional skip attention).

Both follow the description in "LAW & ORDER: Adaptive Spatial Weighting for Medical Diffusion and
Segmentation" (section 3.2, ORDER; section 3.2.1 summarises MK-UNet, Rahman & Marculescu 2025):

* **MK-UNet**: five encoder stages of multi-kernel inverted residual (MKIR) blocks (Eq. 13),
  ``MKIR(x) = x + Proj(Σ_{k∈{1,3,5}} DWConv_k(Expand(x)))`` with a 1×1 expansion ×2, parallel depthwise
  convolutions whose outputs are *summed* and a 1×1 projection, each stage followed by 2×2 max pooling;
  a mirrored MKIR decoder (bilinear ×2 up-sampling) with *additive* skip connections; a 1×1 head.
  Channels ``[4, 8, 16, 24, 32]`` (the paper's setting) give ≈26K parameters against the paper's 27K:
  the ORDER paper describes the decoder as "simple additive skip connections", so the grouped attention
  gates and channel/spatial attention of the original MK-UNet code (≈1.5K parameters) are left out.
* **ORDER**: the same backbone with ``BidirectionalSkipAttention`` fusing the final two skips (the two
  highest-resolution ones). One similarity matrix ``S = Q_d K_eᵀ / √d_h`` (Eq. 15) drives both
  directions (Eq. 16): ``Δ_d = softmax(S) V_e`` updates the decoder features and
  ``Δ_e = softmax(Sᵀ) V_d`` the encoder skip; a confidence gate ``c ∈ [0, 1]`` predicted from globally
  pooled decoder and encoder features scales both residual updates (Eq. 17), and the decoder continues
  with the fused skip ``d' + e'``.

The paper trains binary segmentation with a sigmoid output and BCE + Dice (Eq. 18). Here the head has
``num_classes`` logits and the base class trains with ``DiceCELoss`` (softmax cross-entropy + Dice),
which is the multi-class generalisation of BCE + Dice (identical in spirit for two classes).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import TorchSegmenter
from .protocol import TORCH_PROTOCOL_KEYS

#: Keys every ``TorchSegmenter`` config carries (read by ``TorchSegmenter.train``).
TRAINING_KEYS = ("steps", "batch_size", "lr", "weight_decay", "checkpoint_every", "augment")
#: The depthwise kernel sizes 𝒦 of an MKIR block (paper Eq. 13).
KERNEL_SIZES = (1, 3, 5)


def check_network_cfg(kind: str, cfg: dict, network_keys: Sequence[str]) -> None:
    """Refuse a config with a missing training key or a key neither the trainer nor the network knows."""
    for key in TRAINING_KEYS:
        if key not in cfg:
            raise ConfigError(f"{kind}.{key}", "missing (a training key every segmenter needs)")
    known = {*TRAINING_KEYS, *TORCH_PROTOCOL_KEYS, *network_keys}
    unknown = set(cfg) - {"kind", *known}
    if unknown:
        raise ConfigError(f"{kind}.{sorted(unknown)[0]}", f"unknown key for kind '{kind}'; known: {sorted(known)}")


def positive_int_list(kind: str, key: str, value, min_items: int) -> list[int]:
    if (not isinstance(value, (list, tuple)) or len(value) < min_items
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ConfigError(f"{kind}.{key}", f"expected a list of at least {min_items} positive integers, got {value!r}")
    return [int(v) for v in value]


def positive_int(kind: str, key: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{kind}.{key}", f"expected a positive integer, got {value!r}")
    return int(value)


class MKIRBlock(nn.Module):
    """Multi-kernel inverted residual block (paper Eq. 13).

    1×1 expansion (×``expansion``) + BN + ReLU6 → depthwise convolutions with kernels 1, 3, 5 in
    parallel (each + BN + ReLU6), **summed** → 1×1 projection + BN (linear bottleneck) → residual add.
    When the block changes the width, the residual goes through a bias-free 1×1 convolution, as in
    MK-UNet's code. (MK-UNet's channel shuffle before the projection is a fixed permutation of the
    projection's inputs, so it is omitted: it does not change what the block can represent.)
    """

    def __init__(self, in_channels: int, out_channels: int, expansion: int = 2,
                 kernel_sizes: Sequence[int] = KERNEL_SIZES):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                    nn.ReLU6(inplace=True))
        self.depthwise = nn.ModuleList(
            nn.Sequential(nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden, bias=False),
                          nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
            for k in kernel_sizes)
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expanded = self.expand(x)
        mixed = sum(conv(expanded) for conv in self.depthwise)
        return self.shortcut(x) + self.project(mixed)


class Attended(NamedTuple):
    """Everything one pass of ``BidirectionalSkipAttention.attend`` computed (for inspection and tests).

    ``similarity`` is S, (B, heads, N_d, N_e); ``values_dec`` / ``values_enc`` are V_d (B, heads, N_d, c_h)
    and V_e (B, heads, N_e, c_h); ``delta_dec`` = softmax(S) V_e and ``delta_enc`` = softmax(Sᵀ) V_d in the
    same per-head layout; ``gate`` is c, (B, 1, 1, 1); ``decoder`` / ``encoder`` are d' and e'.
    """

    decoder: torch.Tensor
    encoder: torch.Tensor
    similarity: torch.Tensor
    values_dec: torch.Tensor
    values_enc: torch.Tensor
    delta_dec: torch.Tensor
    delta_enc: torch.Tensor
    gate: torch.Tensor


class BidirectionalSkipAttention(nn.Module):
    """ORDER's selective bidirectional skip attention with a confidence gate (paper Eqs. 14-17).

    Projections (Eq. 14) are 3×3 convolutions: Q_d = Conv_Q(d), K_e = Conv_K(e) into ``attention_dim``
    channels, V_d = Conv_V(d), V_e = Conv_V'(e) keeping the stage's ``channels`` (so the updates add to the
    features directly, as Eq. 17 writes them). The paper names them "Conv" without a kernel size; 3×3
    kernels and ``attention_dim = 64`` are the choice that lands at the paper's 42K-parameter budget.
    S = Q_d K_eᵀ / √d_h is computed **once** per head (``similarity``) and used for both directions:
    Δ_d = softmax(S) V_e (each decoder position reads the encoder) and Δ_e = softmax(Sᵀ) V_d (each encoder
    position reads the decoder). The gate c = σ(MLP([GAP(d); GAP(e)])) is one scalar per image (the
    paper's "global confidence gate") scaling both residual updates: d' = d + c Δ_d, e' = e + c Δ_e.

    Memory: S is (B, heads, N, N) per stage. Stages wider than ``grid`` × ``grid`` positions are
    average-pooled to that grid before attention and the two updates are bilinearly up-sampled back
    (the paper does not say how it bounds the cost; at 64² input the default grid of 32 means the
    attention runs at full stage resolution, 1024 and 256 tokens).

    ``record = True`` makes ``forward`` keep the last ``Attended`` (detached) in ``self.last``.
    """

    def __init__(self, channels: int, attention_dim: int = 64, heads: int = 1, grid: int = 32):
        super().__init__()
        if attention_dim % heads or channels % heads:
            raise ValueError(f"{heads} heads must divide attention_dim {attention_dim} and channels {channels}")
        self.heads = heads
        self.grid = grid
        self.head_dim = attention_dim // heads
        self.query = nn.Conv2d(channels, attention_dim, 3, padding=1)
        self.key = nn.Conv2d(channels, attention_dim, 3, padding=1)
        self.value_dec = nn.Conv2d(channels, channels, 3, padding=1)
        self.value_enc = nn.Conv2d(channels, channels, 3, padding=1)
        self.gate_mlp = nn.Sequential(nn.Linear(2 * channels, 2 * channels), nn.ReLU(inplace=True),
                                      nn.Linear(2 * channels, 1))
        self.record = False
        self.last: Attended | None = None

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads·c, H, W) → (B, heads, H·W, c)."""
        b, channels, h, w = x.shape
        return x.reshape(b, self.heads, channels // self.heads, h * w).transpose(-1, -2)

    def _features(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, heads, H·W, c) → (B, heads·c, H, W)."""
        b, heads, n, c = tokens.shape
        return tokens.transpose(-1, -2).reshape(b, heads * c, *size)

    def similarity(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The shared similarity matrix S = Q_d K_eᵀ / √d_h, (B, heads, N_d, N_e)."""
        return query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)

    def attend(self, decoder: torch.Tensor, encoder: torch.Tensor) -> Attended:
        size = decoder.shape[2:]
        grid = (min(size[0], self.grid), min(size[1], self.grid))
        pooled = tuple(grid) != tuple(size)
        d = F.adaptive_avg_pool2d(decoder, grid) if pooled else decoder
        e = F.adaptive_avg_pool2d(encoder, grid) if pooled else encoder

        similarity = self.similarity(self._tokens(self.query(d)), self._tokens(self.key(e)))
        values_dec, values_enc = self._tokens(self.value_dec(d)), self._tokens(self.value_enc(e))
        delta_dec = torch.softmax(similarity, dim=-1) @ values_enc
        delta_enc = torch.softmax(similarity.transpose(-1, -2), dim=-1) @ values_dec
        update_dec, update_enc = self._features(delta_dec, grid), self._features(delta_enc, grid)
        if pooled:
            update_dec = F.interpolate(update_dec, size=size, mode="bilinear", align_corners=False)
            update_enc = F.interpolate(update_enc, size=size, mode="bilinear", align_corners=False)

        pooled_features = torch.cat([decoder.mean(dim=(2, 3)), encoder.mean(dim=(2, 3))], dim=1)
        gate = torch.sigmoid(self.gate_mlp(pooled_features))[:, :, None, None]
        return Attended(decoder + gate * update_dec, encoder + gate * update_enc, similarity,
                        values_dec, values_enc, delta_dec, delta_enc, gate)

    def forward(self, decoder: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
        """The fused skip d' + e'."""
        attended = self.attend(decoder, encoder)
        if self.record:
            self.last = Attended(*(t.detach() for t in attended))
        return attended.decoder + attended.encoder


class AdditiveSkip(nn.Module):
    """MK-UNet's plain skip fusion: decoder feature + encoder feature."""

    def forward(self, decoder: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
        return decoder + encoder


class MKUNetNetwork(nn.Module):
    """The MK-UNet graph (see the module docstring); ``attention_stages`` skips use ORDER's attention.

    Encoder stage i: MKIR(c_{i-1} → c_i) then 2×2 max pooling, so with n stages the skip of stage i sits
    at 1/2^{i+1} resolution and the bottleneck at 1/2^n. Decoder stage j (from the bottleneck): MKIR
    narrowing to the next skip's width, bilinear ×2, ReLU, then skip fusion; a last MKIR(c_0 → c_0)
    stage returns to full resolution before the 1×1 head. ``attention_stages`` numbers skips from the
    full-resolution end, as the ORDER paper numbers decoder stages: (0, 1) are the final two decoder stages
    (skips of encoder stages 0 and 1), the paper's choice; an empty tuple is MK-UNet.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int],
                 attention_stages: Sequence[int] = (), attention_dim: int = 64, heads: int = 1, grid: int = 32):
        super().__init__()
        channels = list(channels)
        widths = [in_channels, *channels]
        self.encoder = nn.ModuleList(MKIRBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        # decoder stage j maps channels[n-1-j] to channels[n-2-j]; the last one keeps channels[0]
        outs = [*channels[-2::-1], channels[0]]
        self.decoder = nn.ModuleList(MKIRBlock(a, b) for a, b in zip(channels[::-1], outs))
        skip_widths = channels[-2::-1]  # widths of the skips in decoder order (deepest first)
        n_skips = len(skip_widths)
        self.fusions = nn.ModuleList(
            BidirectionalSkipAttention(width, attention_dim, heads, grid) if n_skips - 1 - j in set(attention_stages)
            else AdditiveSkip()
            for j, width in enumerate(skip_widths))
        self.head = nn.Conv2d(channels[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        skips = []
        out = x
        for block in self.encoder:
            out = F.max_pool2d(block(out), 2)
            skips.append(out)
        skips.pop()  # the bottleneck is not a skip
        for block, fusion, skip in zip(self.decoder, self.fusions, reversed(skips)):
            out = F.relu(F.interpolate(block(out), size=skip.shape[2:], mode="bilinear", align_corners=False))
            out = fusion(out, skip)
        out = F.relu(F.interpolate(self.decoder[-1](out), size=size, mode="bilinear", align_corners=False))
        return self.head(out)

    def attention_modules(self) -> list[BidirectionalSkipAttention]:
        return [m for m in self.fusions if isinstance(m, BidirectionalSkipAttention)]


class MKUNet(TorchSegmenter):
    """MK-UNet (Rahman & Marculescu 2025) as summarised by the ORDER paper; config key ``channels``.

    ``channels`` (default ``[4, 8, 16, 24, 32]``, the paper's ≈27K-parameter setting) gives the width of
    each encoder stage; every stage halves the resolution, so inputs must be multiples of 2^len(channels)
    (32 by default) and at least twice that. Trained with Dice + softmax cross-entropy, the multi-class
    generalisation of the paper's BCE + Dice.
    """

    kind = "mk_unet"
    DEFAULT_CHANNELS = (4, 8, 16, 24, 32)
    NETWORK_KEYS: tuple[str, ...] = ("channels",)
    #: the skips fused with bidirectional attention, numbered from the full-resolution end (ORDER: 0 and 1)
    ATTENTION_STAGES: tuple[int, ...] = ()

    def __init__(self, cfg: dict, in_channels: int, num_classes: int,
                 class_names: Sequence[str] | None = None, device: str | torch.device | None = None):
        super().__init__(cfg, in_channels, num_classes, class_names, device)
        check_network_cfg(self.kind, self.cfg, self.NETWORK_KEYS)
        self.channels = positive_int_list(self.kind, "channels", self.cfg.get("channels", list(self.DEFAULT_CHANNELS)),
                                          min_items=2)
        self.attention_stages = self._attention_stages()

    def _attention_stages(self) -> tuple[int, ...]:
        return self.ATTENTION_STAGES

    def _network_kwargs(self) -> dict:
        return {}

    def build_network(self) -> torch.nn.Module:
        return MKUNetNetwork(self.in_channels, self.num_classes, self.channels,
                             attention_stages=self.attention_stages, **self._network_kwargs())

    @property
    def size_divisor(self) -> int:
        return 2 ** len(self.channels)


class ORDER(MKUNet):
    """ORDER (Optimal Region Detection with Efficient Resolution): MK-UNet + bidirectional skip attention.

    The final two skip fusions use ``BidirectionalSkipAttention`` (one shared similarity matrix S for
    both directions, a sigmoid confidence gate scaling both residual updates, fused skip d' + e'); the
    others stay additive. Config keys: ``channels`` (as MK-UNet), ``attention_stages`` (which skips attend,
    numbered from the full-resolution end as the paper numbers decoder stages: default [0, 1], the paper's;
    ``all``; [] is MK-UNet: the paper's Tables 5–6), ``attention_dim`` (Q/K width, default
    64), ``attention_heads`` (default 1; must divide ``attention_dim`` and the two attended widths) and
    ``attention_grid`` (default 32: stages larger than grid × grid are pooled for the attention).
    The defaults give ≈41K parameters for 1 or 3 input channels, against the paper's 42K. The paper's
    binary BCE + Dice objective becomes the base class's softmax cross-entropy + Dice over ``num_classes``.
    """

    kind = "order"
    NETWORK_KEYS = ("channels", "attention_stages", "attention_dim", "attention_heads", "attention_grid")
    ATTENTION_STAGES = (0, 1)
    DEFAULTS = {"attention_dim": 64, "attention_heads": 1, "attention_grid": 32}

    def __init__(self, cfg: dict, in_channels: int, num_classes: int,
                 class_names: Sequence[str] | None = None, device: str | torch.device | None = None):
        super().__init__(cfg, in_channels, num_classes, class_names, device)
        settings = {key: positive_int(self.kind, key, self.cfg.get(key, default))
                    for key, default in self.DEFAULTS.items()}
        heads = settings["attention_heads"]
        for key, width in (("attention_dim", settings["attention_dim"]),
                           *(("channels", self.channels[i]) for i in self.attention_stages)):
            if width % heads:
                raise ConfigError(f"{self.kind}.attention_heads",
                                  f"{heads} heads do not divide {key} width {width}")
        self.attention = settings

    def _attention_stages(self) -> tuple[int, ...]:
        n_skips = len(self.channels) - 1
        value = self.cfg.get("attention_stages", list(self.ATTENTION_STAGES))
        if value == "all":
            return tuple(range(n_skips))
        if (not isinstance(value, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in value)
                or any(not 0 <= i < n_skips for i in value) or len(set(value)) != len(value)):
            raise ConfigError(f"{self.kind}.attention_stages", f"expected 'all' or distinct skip indices in "
                              f"0..{n_skips - 1} (0 = the full-resolution end), got {value!r}")
        return tuple(sorted(value))

    def _network_kwargs(self) -> dict:
        return {"attention_dim": self.attention["attention_dim"], "heads": self.attention["attention_heads"],
                "grid": self.attention["attention_grid"]}
