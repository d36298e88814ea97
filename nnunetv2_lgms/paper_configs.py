"""The published configurations ``paper-check`` instantiates, with the reference figures they must reproduce.

``reference_params`` is the exact count of the official code at that configuration (``../shared/specs``
architectures.md §4); ``paper`` is what the paper's text states, which can differ (LGMSNet-3D).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

from torch import nn


@dataclass(frozen=True)
class PaperConfig:
    model: str
    config: str
    build: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]
    reference_params: int
    paper: str  # the paper's own statement of size / complexity

    def count_params(self, net: nn.Module) -> int:
        # Networks with training-only deep-supervision heads report the inference path, as the papers do.
        from nnunetv2_lgms.networks.common import inference_parameters
        return inference_parameters(net)


def _lgmsnet_2d():
    from nnunetv2_lgms.networks.lgmsnet import LGMSNet
    return LGMSNet(3, 1, nn.Conv2d, deep_supervision=False)


def _lgmsnet_3d():
    from nnunetv2_lgms.networks.lgmsnet import LGMSNet
    return LGMSNet(1, 14, nn.Conv3d, deep_supervision=False)


def _glims(input_channels: int, num_classes: int):
    def build():
        from nnunetv2_lgms.networks.glims import GLIMS
        return GLIMS(input_channels, num_classes, nn.Conv3d, (96, 96, 96), deep_supervision=False)
    return build


_GLIMS_PAPER = ("paper states 47.16M params, 72.30G FLOPs; the official code measures 114.3 GFLOPs = 57.2 GMACs "
                "(torch FlopCounterMode) and 70.55 G MACs (thop)")

PAPER_CONFIGS: List[PaperConfig] = [
    PaperConfig("LGMSNet-2D", "3 in, 1 out, 256x256, no DS", _lgmsnet_2d, (1, 3, 256, 256), 2_321_393,
                "2.32M params, 4.89 'GFlops' (= thop MACs)"),
    PaperConfig("LGMSNet-3D", "1 in, 14 out (BTCV), 96^3, no DS", _lgmsnet_3d, (1, 1, 96, 96, 96), 6_193_742,
                "paper states 9.86M params; the official code has 6.19M (no config in it gives 9.86M)"),
    PaperConfig("GLIMS-BraTS", "4 in, 3 out (BraTS regions), 96^3, no DS", _glims(4, 3), (1, 4, 96, 96, 96),
                47_163_349, _GLIMS_PAPER),
    PaperConfig("GLIMS-BTCV", "1 in, 14 out (BTCV), 96^3, no DS", _glims(1, 14), (1, 1, 96, 96, 96),
                47_167_281, _GLIMS_PAPER),
]
