"""LGMSNet's blocks (arXiv 2508.15476 §3.2-3.4), following the official code where it differs from the paper
(``docs/deviations.md``). Every block serves 2D and 3D through ``conv_op``."""
from __future__ import annotations

from typing import Optional, Sequence, Type

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim

from nnunetv2_lgms.networks.attention import SparseTransformer
from nnunetv2_lgms.networks.common import (ConvNormAct, batch_norm_for, interpolate_to, restrict_kernel,
                                           same_padding)


class LocalMultiscaleBlock(nn.Module):
    """LMS block (§3.2): depthwise convs with kernels 3/5/7/9 on four channel groups, then a bottleneck.

    ``x' = GELU(GN_4(concat_k DW_k(x_k) + x))``; ``out = expand(reduce(x')) + x`` with ``reduce`` a 1x1 conv to C/4
    and ``expand`` a 3x3 conv back to C (both norm + SiLU). Shapes: ``(B, C, *S) -> (B, C, *S)``; C must be a
    multiple of the number of kernels (4).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, norm_op: Type[nn.Module],
                 norm_kwargs: Optional[dict] = None, kernel_sizes: Sequence[int] = (3, 5, 7, 9),
                 plan_kernel: Optional[Sequence[int]] = None, group_norm_groups: int = 4):
        super().__init__()
        plan_kernel = plan_kernel or (3,) * convert_conv_op_to_dim(conv_op)
        if channels % len(kernel_sizes) or channels % group_norm_groups:
            raise ValueError(f"LMS block needs channels divisible by {len(kernel_sizes)} kernel groups and "
                             f"{group_norm_groups} norm groups, got {channels}")
        self.chunk = channels // len(kernel_sizes)
        self.depthwise = nn.ModuleList()
        for k in kernel_sizes:
            kernel = restrict_kernel(k, plan_kernel)
            self.depthwise.append(conv_op(self.chunk, self.chunk, kernel, padding=same_padding(kernel),
                                          groups=self.chunk, bias=True))
        self.norm = nn.GroupNorm(group_norm_groups, channels)
        self.act = nn.GELU()
        bottleneck = channels // 4
        self.reduce = ConvNormAct(conv_op, channels, bottleneck, 1, norm_op, nn.SiLU, norm_kwargs=norm_kwargs)
        self.expand = ConvNormAct(conv_op, bottleneck, channels, restrict_kernel(3, plan_kernel), norm_op, nn.SiLU,
                                  norm_kwargs=norm_kwargs)

    def multiscale(self, x: torch.Tensor) -> torch.Tensor:
        """``concat_k DW_k(x_k)``: each channel group through its own depthwise kernel."""
        return torch.cat([conv(part) for conv, part in zip(self.depthwise, x.split(self.chunk, dim=1))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm(self.multiscale(x) + x))
        return self.expand(self.reduce(y)) + x


class DepthwiseConvBranch(nn.Module):
    """The convolutional quarter of the GMS block: ``x + BN(pw(ReLU(BN(DW3(x)))))`` where ``pw`` is a per-channel
    1x1 scale (grouped conv, groups = C). Always BatchNorm, also in 3D (as in the official code)."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int, plan_kernel: Sequence[int]):
        super().__init__()
        norm = batch_norm_for(conv_op)
        kernel = restrict_kernel(3, plan_kernel)
        self.body = nn.Sequential(
            conv_op(channels, channels, kernel, padding=same_padding(kernel), groups=channels, bias=False),
            norm(channels), nn.ReLU(inplace=True),
            conv_op(channels, channels, 1, groups=channels, bias=False), norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class GlobalMultiscaleBlock(nn.Module):
    """GMS block (§3.3): local conv, then a 3:1 channel split into a sparse Transformer and a depthwise branch,
    a 1x1 fusion and a 3x3 merge with the block input (concatenation, no residual).

    Shapes: ``(B, C_in, *S) -> (B, C_out, *S)``.
    """

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, transformer_channels: int,
                 mlp_dim: int, norm_op: Type[nn.Module], norm_kwargs: Optional[dict] = None,
                 plan_kernel: Optional[Sequence[int]] = None, heads: int = 4, head_dim: int = 8,
                 patch_size: int = 2, depth: int = 1):
        super().__init__()
        plan_kernel = plan_kernel or (3,) * convert_conv_op_to_dim(conv_op)
        if not 0 < transformer_channels < out_channels:
            raise ValueError(f"transformer channels must lie in (0, {out_channels}), got {transformer_channels}")
        k3 = restrict_kernel(3, plan_kernel)
        self.transformer_channels = transformer_channels
        self.local = nn.Sequential(
            ConvNormAct(conv_op, in_channels, out_channels, k3, norm_op, nn.SiLU, norm_kwargs=norm_kwargs),
            ConvNormAct(conv_op, out_channels, out_channels, 1, norm_op, nn.SiLU, norm_kwargs=norm_kwargs))
        self.transformer = SparseTransformer(transformer_channels, mlp_dim, depth, heads, head_dim, patch_size)
        self.conv_branch = DepthwiseConvBranch(conv_op, out_channels - transformer_channels, plan_kernel)
        self.fuse = ConvNormAct(conv_op, out_channels, out_channels, 1, norm_op, nn.SiLU, norm_kwargs=norm_kwargs)
        self.merge = ConvNormAct(conv_op, out_channels + in_channels, out_channels, k3, norm_op, nn.SiLU,
                                 norm_kwargs=norm_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        y_t, y_c = y.split([self.transformer_channels, y.shape[1] - self.transformer_channels], dim=1)
        y = self.fuse(torch.cat([self.transformer(y_t), self.conv_branch(y_c)], dim=1))
        return self.merge(torch.cat([y, x], dim=1))


class FusionConv(nn.Sequential):
    """Decoder fusion (§3.4, CMUNeXt style), activation before norm: 3x3 grouped (2) conv, 1x1 to 4*C_out, 1x1 to
    C_out, each followed by GELU then norm. ``(B, C_in, *S) -> (B, C_out, *S)``."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, norm_op: Type[nn.Module],
                 norm_kwargs: Optional[dict] = None, plan_kernel: Optional[Sequence[int]] = None):
        plan_kernel = plan_kernel or (3,) * convert_conv_op_to_dim(conv_op)
        kw = dict(norm_op=norm_op, act=nn.GELU, bias=True, norm_kwargs=norm_kwargs, act_first=True)
        super().__init__(
            ConvNormAct(conv_op, in_channels, in_channels, restrict_kernel(3, plan_kernel), groups=2, **kw),
            ConvNormAct(conv_op, in_channels, 4 * out_channels, 1, **kw),
            ConvNormAct(conv_op, 4 * out_channels, out_channels, 1, **kw))


class UpConv(nn.Module):
    """Linear upsampling to the skip's size, then 3x3 conv (bias) + norm + ReLU. ``(B, C_in, *s) -> (B, C_out, *S)``.

    The official code upsamples by a fixed factor 2; resizing to the skip's size is identical for factor 2 and also
    serves nnU-Net's per-axis strides such as (1, 2, 2)."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, norm_op: Type[nn.Module],
                 norm_kwargs: Optional[dict] = None, plan_kernel: Optional[Sequence[int]] = None):
        super().__init__()
        plan_kernel = plan_kernel or (3,) * convert_conv_op_to_dim(conv_op)
        self.conv = ConvNormAct(conv_op, in_channels, out_channels, restrict_kernel(3, plan_kernel), norm_op,
                                nn.ReLU, bias=True, norm_kwargs=norm_kwargs)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(interpolate_to(x, size))
