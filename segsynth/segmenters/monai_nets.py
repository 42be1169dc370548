"""MONAI's 2D U-Nets as benchmark segmenters: only the network construction differs between them."""

from __future__ import annotations

import math

import torch
from monai.networks.nets import BasicUNet, UNet

from .base import TorchSegmenter


class MonaiUNet(TorchSegmenter):
    """``monai.networks.nets.UNet``; config keys ``channels``, ``strides``, ``num_res_units``."""

    kind = "monai_unet"

    def build_network(self) -> torch.nn.Module:
        return UNet(spatial_dims=2, in_channels=self.in_channels, out_channels=self.num_classes,
                    channels=tuple(self.cfg["channels"]), strides=tuple(self.cfg["strides"]),
                    num_res_units=int(self.cfg["num_res_units"]))

    @property
    def size_divisor(self) -> int:
        return math.prod(int(s) for s in self.cfg["strides"])


class MonaiBasicUNet(TorchSegmenter):
    """``monai.networks.nets.BasicUNet``; config key ``features`` (six widths)."""

    kind = "monai_basicunet"
    #: BasicUNet always max-pools four times.
    DOWNSAMPLINGS = 4

    def build_network(self) -> torch.nn.Module:
        return BasicUNet(spatial_dims=2, in_channels=self.in_channels, out_channels=self.num_classes,
                         features=tuple(self.cfg["features"]))

    @property
    def size_divisor(self) -> int:
        return 2 ** self.DOWNSAMPLINGS
