"""GLIMS's convolutional blocks (arXiv 2404.17854; official ``Modules/``), following the official code where it
differs from the paper (``docs/deviations.md``). Every block serves 2D and 3D through ``conv_op``.

"conv-IN-PReLU" below is MONAI's ``Convolution`` as GLIMS builds it: conv with bias -> InstanceNorm (affine=False)
-> PReLU with a single parameter.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim

from nnunetv2_lgms.networks.common import ConvNormAct, as_tuple, instance_norm_for, restrict_kernel, same_padding


def conv_in_prelu(conv_op: Type[_ConvNd], in_channels: int, out_channels: int, kernel_size=1) -> ConvNormAct:
    """MONAI ``Convolution`` (stride 1, 'same' padding): conv (bias) -> InstanceNorm (affine=False) -> PReLU(1)."""
    return ConvNormAct(conv_op, in_channels, out_channels, kernel_size, instance_norm_for(conv_op), nn.PReLU,
                       bias=True)


class StridedConvINPReLU(nn.Sequential):
    """Down (``transposed=False``: conv, kernel = stride) or up (``transposed=True``: transposed conv, kernel =
    stride) by the per-axis ``stride``, then InstanceNorm (affine=False) and PReLU(1). Official: k2 s2 on every axis;
    nnU-Net plans give per-axis strides such as (1, 2, 2), and stride 1 gives a 1x1 conv.
    ``(B, C_in, *S) -> (B, C_out, *S / stride)`` (or ``* stride``)."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, stride: Sequence[int],
                 transposed: bool = False):
        dim = convert_conv_op_to_dim(conv_op)
        stride = as_tuple(stride, dim)
        op = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim] if transposed else conv_op
        super().__init__(op(in_channels, out_channels, stride, stride=stride, bias=True),
                         instance_norm_for(conv_op)(out_channels), nn.PReLU())


class DACB(nn.Module):
    """Dilated Attention Convolution Block, official ``DACB(in_c=C, emb_dim=E)``.

    Three parallel depthwise 3x3(x3) convs (bias) with dilation 1, 2, 3, each followed by GroupNorm(C groups) and its
    own PReLU; concat (3C) -> 1x1 conv-IN-PReLU 3C -> E -> 1x1 conv-IN-PReLU E -> C; ``+ x``; InstanceNorm
    (affine=False); PReLU. ``self.unused_prelu`` mirrors a PReLU the official block creates but never calls, kept
    (frozen) so that the parameter count matches (1 parameter). Kernels are 1 on axes where the plan's kernel is 1.
    ``(B, C, *S) -> (B, C, *S)``.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, emb_dim: int,
                 plan_kernel: Optional[Sequence[int]] = None, dilations: Sequence[int] = (1, 2, 3)):
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)
        kernel = restrict_kernel(3, plan_kernel or (3,) * dim)
        self.dilated_convs = nn.ModuleList(
            conv_op(channels, channels, kernel, padding=same_padding(kernel, d), dilation=d, groups=channels,
                    bias=True) for d in dilations)
        self.dilated_norms = nn.ModuleList(nn.GroupNorm(channels, channels) for _ in dilations)
        self.dilated_acts = nn.ModuleList(nn.PReLU() for _ in dilations)
        self.compress = nn.Sequential(conv_in_prelu(conv_op, len(dilations) * channels, emb_dim),
                                      conv_in_prelu(conv_op, emb_dim, channels))
        self.norm = instance_norm_for(conv_op)(channels)
        self.act = nn.PReLU()
        self.unused_prelu = nn.PReLU()  # official dead parameter, never used in forward
        # frozen so that DDP (which fails on parameters that never receive a gradient) and optimisers ignore it;
        # it still counts towards the parameter total, as in the official model
        self.unused_prelu.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [act(norm(conv(x))) for conv, norm, act in zip(self.dilated_convs, self.dilated_norms,
                                                                   self.dilated_acts)]
        return self.act(self.norm(self.compress(torch.cat(branches, dim=1)) + x))


class CSAB(nn.Module):
    """Channel-Spatial Attention Block on a skip connection, official ``CSAB(gate_channels=C, reduction_ratio=2)``.

    * channel gate: ``sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))``, MLP = Linear C -> C/2, ReLU, Linear C/2 -> C.
    * spatial gate: ``[max_c(x), mean_c(x)]`` -> conv 2 -> 1, kernel 7 (1 on axes where the plan kernel is 1), no
      bias -> LayerNorm over the (single) channel -> PReLU -> sigmoid.
    * output ``x * channel_gate * spatial_gate`` (both gates computed from ``x``; no residual).

    The official spatial gate is degenerate: a LayerNorm over one channel always returns its bias, so the spatial map
    is one learnable constant and the 7-tap conv receives exactly zero gradient. ``fix_spatial_gate=False`` (default)
    reproduces this; ``fix_spatial_gate=True`` drops that LayerNorm so the gate depends on the input (2 parameters
    fewer per CSAB). ``(B, C, *S) -> (B, C, *S)``.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, reduction_ratio: int = 2,
                 plan_kernel: Optional[Sequence[int]] = None, spatial_kernel: int = 7, fix_spatial_gate: bool = False):
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)
        self.mlp = nn.Sequential(nn.Linear(channels, channels // reduction_ratio), nn.ReLU(),
                                 nn.Linear(channels // reduction_ratio, channels))
        kernel = restrict_kernel(spatial_kernel, plan_kernel or (3,) * dim)
        self.spatial_conv = conv_op(2, 1, kernel, padding=same_padding(kernel), bias=False)
        self.fix_spatial_gate = fix_spatial_gate
        self.spatial_norm = None if fix_spatial_gate else nn.LayerNorm(1)
        self.spatial_act = nn.PReLU()

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        logits = self.mlp(flat.mean(dim=2)) + self.mlp(flat.amax(dim=2))
        return torch.sigmoid(logits).view(*x.shape[:2], *(1,) * (x.ndim - 2))

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, 1, *S)``."""
        y = self.spatial_conv(torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1))
        if self.spatial_norm is not None:
            y = self.spatial_norm(y.movedim(1, -1)).movedim(-1, 1)
        return torch.sigmoid(self.spatial_act(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.channel_gate(x) * self.spatial_gate(x))


class DMSF(nn.Module):
    """Encoder stage (official ``DMSF``/"DADB"): two DACB(C, 2C) give the skip; a strided conv-IN-PReLU C -> 2C by the
    level's stride gives the next level. ``(B, C, *S) -> (skip (B, C, *S), down (B, 2C, *S / stride))``."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int, stride: Sequence[int],
                 plan_kernel: Optional[Sequence[int]] = None, num_blocks: int = 2):
        super().__init__()
        self.blocks = nn.Sequential(*[DACB(conv_op, channels, 2 * channels, plan_kernel) for _ in range(num_blocks)])
        self.down = StridedConvINPReLU(conv_op, channels, 2 * channels, stride)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        skip = self.blocks(x)
        return skip, self.down(skip)


class DMSU(nn.Module):
    """Decoder stage (official ``DMSU``/"DAUB"): transposed conv-IN-PReLU 2C -> C by the level's stride; concat
    ``[up, skip]`` (2C) -> 1x1 conv-IN-PReLU -> C; two DACB(C, 2C). (The official ``emb_dim`` argument is unused
    there too.) ``(B, 2C, *S / stride), skip (B, C, *S) -> (B, C, *S)``."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int, stride: Sequence[int],
                 plan_kernel: Optional[Sequence[int]] = None, num_blocks: int = 2):
        super().__init__()
        self.up = StridedConvINPReLU(conv_op, 2 * channels, channels, stride, transposed=True)
        self.fuse = conv_in_prelu(conv_op, 2 * channels, channels)
        self.blocks = nn.Sequential(*[DACB(conv_op, channels, 2 * channels, plan_kernel) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.fuse(torch.cat([self.up(x), skip], dim=1)))
