"""A Swin-Unet-style pure-transformer U-Net (Cao et al. 2022), built from MONAI's Swin blocks.

Not the authors' code: the encoder and decoder stages are ``monai.networks.nets.swin_unetr.BasicLayer``
(MONAI's shifted-window ``SwinTransformerBlock``s, with MONAI's ``PatchMerging`` as the encoder's
down-sampling), and the parts MONAI lacks (patch expanding, the final ×4 patch expanding) are written
here after the Swin-Unet paper:

* patch embedding: 4×4 convolution with stride 4 → ``embed_dim`` channels, LayerNorm;
* encoder: stage i (i < L-1) = ``depths[i]`` Swin blocks at width ``embed_dim·2^i`` followed by patch
  merging; the last stage (no merging) is the bottleneck, followed by LayerNorm. As in Swin-Unet, the
  skip of stage i is that stage's input (the tokens before its Swin blocks);
* decoder: patch expanding (linear ×2 width, rearranged to 2×2 positions, LayerNorm) to the next
  stage's width and resolution, concatenation with the skip, a linear layer back to the stage width,
  ``depths[i]`` Swin blocks; LayerNorm;
* final patch expanding ×4 (linear ×16, rearranged to 4×4 positions, LayerNorm) and a 1×1 convolution.

Stochastic depth and dropout are off, so a resumed run is bit-identical to an uninterrupted one.
Optional ``pretrained_swin``: a local Swin-T-style ``.pth`` whose keys follow Microsoft's Swin
Transformer naming (``patch_embed.*``, ``layers.<i>.blocks.<j>.*``, ``layers.<i>.downsample.*``,
``norm.*``); every tensor whose (renamed) key and shape match is loaded into the encoder, and, as
Swin-Unet does, encoder block weights are also copied into the decoder blocks of the same stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from monai.networks.nets.swin_unetr import BasicLayer, PatchMerging

from ..errors import ConfigError, InputDataError
from .base import TorchSegmenter
from .lightweight import check_network_cfg, positive_int, positive_int_list

log = logging.getLogger(__name__)

PATCH_SIZE = 4


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch``×``patch`` patches → ``dim`` channels, LayerNorm; output channels-last."""

    def __init__(self, in_channels: int, dim: int, patch: int = PATCH_SIZE):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_channels_last(self.proj(x)))


class PatchExpand(nn.Module):
    """Swin-Unet's patch expanding: linear to ``scale²·out_dim`` channels, spread over scale×scale positions.

    Channels-last in and out: (B, H, W, dim) → (B, scale·H, scale·W, out_dim), then LayerNorm.
    """

    def __init__(self, dim: int, out_dim: int, scale: int):
        super().__init__()
        self.scale = scale
        self.out_dim = out_dim
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x).reshape(b, h, w, s, s, self.out_dim)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, self.out_dim)
        return self.norm(x)


def _swin_stage(dim: int, depth: int, heads: int, window: int, downsample) -> BasicLayer:
    return BasicLayer(dim=dim, depth=depth, num_heads=heads, window_size=(window, window),
                      drop_path=[0.0] * depth, mlp_ratio=4.0, qkv_bias=True, downsample=downsample)


class SwinUNetNetwork(nn.Module):
    """The Swin-Unet graph (module docstring); input (N, C, H, W), output (N, num_classes, H, W) logits."""

    def __init__(self, in_channels: int, num_classes: int, embed_dim: int, depths: Sequence[int],
                 num_heads: Sequence[int], window_size: int):
        super().__init__()
        levels = len(depths)
        dims = [embed_dim * 2 ** i for i in range(levels)]
        self.patch_embed = PatchEmbed(in_channels, embed_dim)
        # Swin naming (layers.<i>, downsample, norm) so Swin-T checkpoints map key by key
        self.layers = nn.ModuleList(
            _swin_stage(dims[i], depths[i], num_heads[i], window_size, PatchMerging if i < levels - 1 else None)
            for i in range(levels))
        self.norm = nn.LayerNorm(dims[-1])
        # decoder modules indexed by level i = 0 .. L-2 (level L-1 is the bottleneck)
        self.expand = nn.ModuleList(PatchExpand(dims[i + 1], dims[i], 2) for i in range(levels - 1))
        self.concat_back = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in range(levels - 1))
        self.layers_up = nn.ModuleList(
            _swin_stage(dims[i], depths[i], num_heads[i], window_size, None) for i in range(levels - 1))
        self.norm_up = nn.LayerNorm(dims[0])
        self.final_expand = PatchExpand(dims[0], dims[0], PATCH_SIZE)
        self.head = nn.Conv2d(dims[0], num_classes, 1, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Swin's initialisation: truncated normal (σ = 0.02) linear weights, zero biases, unit LayerNorms."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)  # (B, H/4, W/4, E)
        skips = []
        for layer in self.layers:
            skips.append(tokens)
            tokens = _channels_last(layer(_channels_first(tokens)))
        tokens = self.norm(tokens)
        for level in reversed(range(len(self.layers_up))):
            tokens = self.expand[level](tokens)
            tokens = self.concat_back[level](torch.cat([tokens, skips[level]], dim=-1))
            tokens = _channels_last(self.layers_up[level](_channels_first(tokens)))
        tokens = self.final_expand(self.norm_up(tokens))
        return self.head(_channels_first(tokens))


def _swin_key(key: str) -> str:
    """A Microsoft Swin checkpoint key in this network's naming (MONAI calls the MLP layers linear1/2)."""
    for prefix in ("module.", "backbone.", "encoder."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")


def load_swin_weights(network: SwinUNetNetwork, path) -> list[str]:
    """Copy the matching tensors of a Swin-T-style checkpoint into ``network``; return the keys loaded.

    Keys are renamed (``_swin_key``) and loaded when the shape matches; ``layers.<i>.blocks.*`` also
    initialise ``layers_up.<i>.blocks.*`` (Swin-Unet's symmetric initialisation). A 3-channel patch
    embedding is summed over its input channels for a 1-channel network. Relative-position indices are
    recomputed, not loaded; the classification head is ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "pretrained_swin checkpoint does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise InputDataError(path, f"cannot be read as a torch checkpoint ({err})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise InputDataError(path, "is not a state dict")
    own = network.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or key.endswith("relative_position_index") or key.endswith("attn_mask"):
            continue
        name = _swin_key(key)
        targets = [name]
        if name.startswith("layers.") and ".blocks." in name:
            targets.append("layers_up." + name[len("layers."):])
        for target in targets:
            if target not in own:
                continue
            if (target == "patch_embed.proj.weight" and value.ndim == 4 and value.shape[1] != own[target].shape[1]
                    and own[target].shape[1] == 1):
                value = value.sum(dim=1, keepdim=True)
            if value.shape == own[target].shape:
                loaded[target] = value.to(own[target].dtype)
    if not loaded:
        raise InputDataError(path, f"no tensor matches the Swin-Unet encoder by name and shape "
                                   f"({len(state)} keys in the file; check embed_dim, num_heads, window_size)")
    network.load_state_dict(loaded, strict=False)
    encoder_keys = [k for k in own if not k.endswith("relative_position_index")
                    and not k.startswith(("layers_up.", "expand.", "concat_back.", "norm_up.", "final_expand.", "head."))]
    log.info("swin_unet: loaded %d tensors from %s (%d of %d encoder tensors matched)", len(loaded), path,
             sum(k in loaded for k in encoder_keys), len(encoder_keys))
    return sorted(loaded)


class SwinUNet(TorchSegmenter):
    """Swin-Unet-style, built from MONAI's Swin blocks (see the module docstring).

    Config keys: ``embed_dim`` (default 24, CPU-sized; Swin-T is 96), ``depths`` (Swin blocks per stage,
    the last stage being the bottleneck; default ``[2, 2, 2]``), ``num_heads`` (per stage, default
    ``[1, 2, 4]``), ``window_size`` (default 4, for 64² inputs whose first stage is 16×16 tokens),
    ``pretrained_swin`` (optional path of a local Swin-T ``.pth``, loaded into a freshly initialised
    network before training). Inputs must be multiples of 4·2^(L-1) (16 by default) and at least twice it.
    """

    kind = "swin_unet"
    NETWORK_KEYS = ("embed_dim", "depths", "num_heads", "window_size", "pretrained_swin")
    DEFAULTS = {"embed_dim": 24, "depths": [2, 2, 2], "num_heads": [1, 2, 4], "window_size": 4}

    def __init__(self, cfg: dict, in_channels: int, num_classes: int,
                 class_names: Sequence[str] | None = None, device: str | torch.device | None = None):
        super().__init__(cfg, in_channels, num_classes, class_names, device)
        kind, get = self.kind, lambda key: self.cfg.get(key, self.DEFAULTS[key])
        check_network_cfg(kind, self.cfg, self.NETWORK_KEYS)
        self.embed_dim = positive_int(kind, "embed_dim", get("embed_dim"))
        self.depths = positive_int_list(kind, "depths", get("depths"), min_items=2)
        self.num_heads = positive_int_list(kind, "num_heads", get("num_heads"), min_items=2)
        self.window_size = positive_int(kind, "window_size", get("window_size"))
        if len(self.num_heads) != len(self.depths):
            raise ConfigError(f"{kind}.num_heads", f"{len(self.num_heads)} entries for {len(self.depths)} depths")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2 ** i) % heads:
                raise ConfigError(f"{kind}.num_heads", f"{heads} heads do not divide stage {i}'s width "
                                  f"{self.embed_dim * 2 ** i} (embed_dim·2^{i})")
        pretrained = self.cfg.get("pretrained_swin")
        if pretrained is not None and not isinstance(pretrained, str):
            raise ConfigError(f"{kind}.pretrained_swin", f"expected a file path, got {pretrained!r}")
        self.pretrained_swin = pretrained

    def build_network(self) -> torch.nn.Module:
        return SwinUNetNetwork(self.in_channels, self.num_classes, self.embed_dim, self.depths, self.num_heads,
                               self.window_size)

    def _initialise(self, seed: int) -> torch.nn.Module:
        """A fresh network, with the Swin-T weights when ``pretrained_swin`` names a file (training only:
        a saved model carries all its weights, so loading one never needs the checkpoint)."""
        network = super()._initialise(seed)
        if self.pretrained_swin:
            load_swin_weights(network, self.pretrained_swin)
        return network

    @property
    def size_divisor(self) -> int:
        return PATCH_SIZE * 2 ** (len(self.depths) - 1)
