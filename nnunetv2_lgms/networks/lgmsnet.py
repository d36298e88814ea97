"""LGMSNet (Dong et al., "LGMSNet: Thinning a medical image segmentation model via dual-level multiscale fusion",
arXiv 2508.15476, ECAI 2025), one implementation for 2D and 3D, built from an nnU-Net plan.

Topology (§3.1, official ``MKtinyvit4_CT`` / ``MKtinyvit4_CT3D``), widths ``f = (16, 32, 64, 128, 128)``:

====================  ===========================================  ==========================
level (resolution)    encoder                                      decoder
====================  ===========================================  ==========================
0 (1)                 stem 3x3; LMS(f0) + 1x1 -> f0                 fusion(2 f0 -> f0)
1 (1/2)               LMS(f0) + 1x1 -> f1                          fusion(2 f1 -> f1)
2 (1/4)               LMS(f1) + 1x1 -> f2                          fusion(2 f2 -> f2) + GMS(f2)
3 (1/8)               GMS(f2 -> f3)                                 GMS(2 f3 -> f3)
4 (1/16)              GMS(f3 -> f4) (bottleneck)
====================  ===========================================  ==========================

nnU-Net plumbing (not in the paper): the four downsamplings use the first four per-axis pooling strides of the plan
(missing ones become stride 1, extra ones are ignored), kernels shrink to 1 on axes where the plan's kernel is 1,
and 1x1 deep-supervision heads sit on decoder levels 0-3 (full resolution first).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, convert_dim_to_conv_op

from nnunetv2_lgms.networks.common import ConvNormAct, batch_norm_for, count_parameters, instance_norm_for
from nnunetv2_lgms.networks.lgms_blocks import FusionConv, GlobalMultiscaleBlock, LocalMultiscaleBlock, UpConv

NUM_LEVELS = 5  # the paper's topology: 4 downsamplings
PAPER_FEATURES = (16, 32, 64, 128, 128)


def lgmsnet_strides(plan_strides: Sequence[Sequence[int]], dim: int) -> List[Tuple[int, ...]]:
    """The 5 per-level strides LGMSNet uses for an nnU-Net plan: the plan's first five entries (the first is the
    stride-1 stem), padded with stride 1 when the plan has fewer stages."""
    strides = [tuple(int(v) for v in s) for s in plan_strides[:NUM_LEVELS]]
    if strides and any(v != 1 for v in strides[0]):
        raise ValueError(f"LGMSNet expects the plan's first stride to be 1 on every axis (nnU-Net's default "
                         f"planners write that), got {strides[0]}")
    return strides + [(1,) * dim] * (NUM_LEVELS - len(strides))


def lgmsnet_deep_supervision_scales(plan_strides: Sequence[Sequence[int]], dim: int) -> List[List[float]]:
    """Scales of the deep-supervision outputs for nnU-Net's loss, full resolution first (one per decoder level)."""
    strides = np.array(lgmsnet_strides(plan_strides, dim), dtype=float)
    return [list(s) for s in (1 / np.cumprod(strides, axis=0))[:-1]]


class LGMSNetEncoder(nn.Module):
    """Stem and the five encoder levels. ``(B, C_in, *S) -> [skip_0 .. skip_4]``, skip_i of width ``f_i``."""

    def __init__(self, conv_op, input_channels, features, strides, kernel_sizes, norm_op, norm_kwargs,
                 lms_blocks_per_stage, transformer_fraction, mlp_ratio):
        super().__init__()
        pool_op = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[convert_conv_op_to_dim(conv_op)]
        norm = dict(norm_op=norm_op, norm_kwargs=norm_kwargs)
        self.stem = ConvNormAct(conv_op, input_channels, features[0], tuple(3 if k > 1 else 1 for k in kernel_sizes[0]),
                                act=nn.ReLU, bias=True, **norm)
        self.pools = nn.ModuleList(
            nn.Identity() if all(s == 1 for s in stride) else pool_op(stride, stride) for stride in strides)
        self.stages = nn.ModuleList()
        for level in range(3):
            width_in = features[max(level - 1, 0)]
            self.stages.append(nn.Sequential(
                *[LocalMultiscaleBlock(conv_op, width_in, plan_kernel=kernel_sizes[level], **norm)
                  for _ in range(lms_blocks_per_stage[level])],
                ConvNormAct(conv_op, width_in, features[level], 1, act=nn.SiLU, **norm)))
        for level in (3, 4):
            width = features[level]
            self.stages.append(GlobalMultiscaleBlock(
                conv_op, features[level - 1], width, transformer_width(width, transformer_fraction),
                int(mlp_ratio * width), plan_kernel=kernel_sizes[level], **norm))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.levels(self.stem(x))

    def levels(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The five levels on the stem's output."""
        skips = []
        for pool, stage in zip(self.pools, self.stages):
            x = stage(pool(x))
            skips.append(x)
        return skips


class LGMSNetDecoder(nn.Module):
    """Four decoder levels and their 1x1 heads. ``[skip_0 .. skip_4] -> logits`` (tensor), or with
    ``deep_supervision`` a list of logits at levels 0, 1, 2, 3 (full resolution first). The heads on levels 1-3 are
    training-only auxiliaries (not in the paper)."""

    def __init__(self, conv_op, features, kernel_sizes, num_classes, norm_op, norm_kwargs, transformer_fraction,
                 mlp_ratio, deep_supervision):
        super().__init__()
        self.deep_supervision = deep_supervision
        norm = dict(norm_op=norm_op, norm_kwargs=norm_kwargs)
        self.ups = nn.ModuleList(
            UpConv(conv_op, features[level + 1] if level < 3 else features[4], features[level],
                   plan_kernel=kernel_sizes[level], **norm) for level in range(4))
        f3, f2 = features[3], features[2]
        self.stages = nn.ModuleList([
            FusionConv(conv_op, 2 * features[0], features[0], plan_kernel=kernel_sizes[0], **norm),
            FusionConv(conv_op, 2 * features[1], features[1], plan_kernel=kernel_sizes[1], **norm),
            nn.Sequential(
                FusionConv(conv_op, 2 * f2, f2, plan_kernel=kernel_sizes[2], **norm),
                GlobalMultiscaleBlock(conv_op, f2, f2, transformer_width(f2, transformer_fraction),
                                      int(mlp_ratio * f2), plan_kernel=kernel_sizes[2], **norm)),
            GlobalMultiscaleBlock(conv_op, 2 * f3, f3, transformer_width(f3, transformer_fraction),
                                  int(mlp_ratio * f3), plan_kernel=kernel_sizes[3], **norm),
        ])
        self.seg_layers = nn.ModuleList(conv_op(features[level], num_classes, 1, bias=True) for level in range(4))

    def forward(self, skips: List[torch.Tensor]) -> Union[torch.Tensor, List[torch.Tensor]]:
        x = skips[-1]
        outputs = []
        for level in (3, 2, 1, 0):
            skip = skips[level]
            x = self.fuse(level, skip, self.ups[level](x, skip.shape[2:]))
            if self.deep_supervision or level == 0:
                outputs.append(self.seg_layers[level](x))
        return outputs[::-1] if self.deep_supervision else outputs[0]

    def fuse(self, level: int, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Decoder stage ``level`` on ``concat(skip, up)``."""
        return self.stages[level](torch.cat([skip, up], dim=1))


def transformer_width(width: int, fraction: float) -> int:
    """Transformer share of a GMS block's channels (official split 3:1, e.g. 96/32 for 128 channels)."""
    c_t = width * fraction
    if c_t != int(c_t) or not 0 < c_t < width:
        raise ValueError(f"GMS width {width} cannot be split {fraction:g} : {1 - fraction:g} into whole channels; "
                         f"use multiples of 4")
    return int(c_t)


class LGMSNet(nn.Module):
    """LGMSNet for 2D (``conv_op=nn.Conv2d``) or 3D (``nn.Conv3d``).

    Args:
        input_channels: image channels (any).
        num_classes: output channels (labels incl. background, or regions); raw logits.
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        strides: five per-axis strides, the first all ones (see :func:`lgmsnet_strides`). Default: 2 on all axes.
        kernel_sizes: five per-axis plan kernels; only whether an axis is 1 matters. Default: 3 everywhere.
        features_per_stage: widths ``f_0..f_4``; multiples of 4.
        deep_supervision: return a list of logits (levels 0-3, full resolution first) instead of one tensor.
            nnU-Net toggles ``self.decoder.deep_supervision``.
        norm_op: default BatchNorm in 2D and InstanceNorm (affine=False) in 3D, as in the official code. The
            GroupNorm(4) of the LMS block and the BatchNorm of the GMS depthwise branch are fixed, also as there.

    Shapes: ``(B, input_channels, *S) -> (B, num_classes, *S)``; at level i the map is ``S / prod(strides[:i+1])``.
    """

    def __init__(self, input_channels: int, num_classes: int, conv_op: Type[_ConvNd] = nn.Conv2d,
                 strides: Optional[Sequence[Sequence[int]]] = None,
                 kernel_sizes: Optional[Sequence[Sequence[int]]] = None,
                 features_per_stage: Sequence[int] = PAPER_FEATURES,
                 lms_blocks_per_stage: Sequence[int] = (1, 1, 1),
                 deep_supervision: bool = False,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[dict] = None,
                 transformer_fraction: float = 0.75, mlp_ratio: float = 2.0):
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)
        strides = lgmsnet_strides(strides, dim) if strides is not None else [(1,) * dim] + [(2,) * dim] * 4
        kernel_sizes = [tuple(k) for k in (kernel_sizes or [(3,) * dim] * NUM_LEVELS)]
        kernel_sizes += [kernel_sizes[-1]] * (NUM_LEVELS - len(kernel_sizes))
        if len(features_per_stage) != NUM_LEVELS or any(f % 4 for f in features_per_stage):
            raise ValueError(f"features_per_stage needs {NUM_LEVELS} multiples of 4, got {features_per_stage}")
        if norm_op is None:
            norm_op = batch_norm_for(conv_op) if dim == 2 else instance_norm_for(conv_op)
        self.strides = strides
        self.encoder = LGMSNetEncoder(conv_op, input_channels, features_per_stage, strides, kernel_sizes, norm_op,
                                      norm_op_kwargs, lms_blocks_per_stage, transformer_fraction, mlp_ratio)
        self.decoder = LGMSNetDecoder(conv_op, features_per_stage, kernel_sizes, num_classes, norm_op,
                                      norm_op_kwargs, transformer_fraction, mlp_ratio, deep_supervision)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        return self.decoder(self.encoder(x))

    def deep_supervision_heads(self) -> nn.ModuleList:
        """The heads only the deep-supervision outputs use (levels 1-3)."""
        return self.decoder.seg_layers[1:]

    def num_parameters(self, include_auxiliary_heads: bool = False) -> int:
        """Parameters of the inference path; the deep-supervision heads of levels 1-3 only with the flag."""
        n = count_parameters(self)
        if not include_auxiliary_heads:
            n -= sum(count_parameters(h) for h in self.decoder.seg_layers[1:])
        return n

    @classmethod
    def from_plan(cls, patch_size: Sequence[int], plan_strides: Sequence[Sequence[int]],
                  plan_kernel_sizes: Sequence[Sequence[int]], input_channels: int, num_classes: int,
                  deep_supervision: bool = True, **kwargs) -> "LGMSNet":
        """Build from an nnU-Net configuration (patch size, ``strides``, ``kernel_sizes`` of ``arch_kwargs``)."""
        dim = len(patch_size)
        return cls(input_channels, num_classes, convert_dim_to_conv_op(dim), lgmsnet_strides(plan_strides, dim),
                   list(plan_kernel_sizes)[:NUM_LEVELS], deep_supervision=deep_supervision, **kwargs)
