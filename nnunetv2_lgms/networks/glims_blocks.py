"""GLIMS's convolutional blocks (arXiv 2404.17854; official ``Modules/``), following the official code where it
differs from the paper (see README, "Deviations"). Every block serves 2D and 3D through ``conv_op``.

"conv-IN-PReLU" below is MONAI's ``Convolution`` as GLIMS builds it: conv with bias -> InstanceNorm (affine=False)
-> PReLU with a single parameter.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim

from nnunetv2_lgms.flops import is_counting_flops
from nnunetv2_lgms.networks.blocks import (ConvNormAct, ScalarPReLU, as_tuple, in_memory_format_of, instance_norm_for,
                                           layout_keeping, norm_act_on_fresh, restrict_kernel, same_padding,
                                           to_channels_last)
from nnunetv2_lgms.networks.cpu_inference import can_overwrite_intermediates
from nnunetv2_lgms.networks.cpu_training import depthwise_conv_module
from nnunetv2_lgms.networks.sub_grids import dilated_depthwise_conv, sub_grid_dilation


def conv_in_prelu(conv_op: Type[_ConvNd], in_channels: int, out_channels: int, kernel_size=1) -> ConvNormAct:
    """MONAI ``Convolution`` (stride 1, 'same' padding): conv (bias) -> InstanceNorm (affine=False) -> PReLU(1)."""
    return ConvNormAct(conv_op, in_channels, out_channels, kernel_size, layout_keeping(instance_norm_for(conv_op)),
                       ScalarPReLU, bias=True)


def cpu_inference_path(x: torch.Tensor) -> bool:
    """Whether GLIMS's CPU inference paths apply: CPU, no autograd, not traced, FLOPs not being counted."""
    return x.device.type == "cpu" and can_overwrite_intermediates(x) and not is_counting_flops()


class StridedConvINPReLU(nn.Sequential):
    """Down (``transposed=False``: conv, kernel = stride) or up (``transposed=True``: transposed conv, kernel =
    stride) by the per-axis ``stride``, then InstanceNorm (affine=False) and PReLU(1). Official: k2 s2 on every axis;
    nnU-Net plans give per-axis strides such as (1, 2, 2), and stride 1 gives a 1x1 conv.
    ``(B, C_in, *S) -> (B, C_out, *S / stride)`` (or ``* stride``).

    Speed (``norm_in_place``): in CPU inference the norm and PReLU overwrite the conv's output
    (:func:`norm_act_on_fresh`)."""

    norm_in_place: bool = True

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, stride: Sequence[int],
                 transposed: bool = False):
        dim = convert_conv_op_to_dim(conv_op)
        stride = as_tuple(stride, dim)
        op = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim] if transposed else conv_op
        super().__init__(op(in_channels, out_channels, stride, stride=stride, bias=True),
                         layout_keeping(instance_norm_for(conv_op))(out_channels), ScalarPReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_in_place and cpu_inference_path(x):
            return norm_act_on_fresh(self[0](x), list(self)[1:])
        return super().forward(x)


def depthwise_conv_cpu(x: torch.Tensor, conv: _ConvNd, fast_backward: bool = True) -> torch.Tensor:
    """``conv(x)`` for a depthwise 'same'-padded (dilated) conv, computed in a form that is fast on CPU.

    oneDNN's CPU kernels for dilated depthwise convs are slow, pathologically so on contiguous inputs and in the
    backward (a 3x3x3, dilation-2 conv on 2x24x40x56x40: ~15 s forward, ~25 s backward). So when gradients are
    needed a dilated conv runs as an undilated conv on its interleaved sub-grids
    (:mod:`~nnunetv2_lgms.networks.sub_grids`, "space to batch"; same result), the output in the input's memory
    format. Otherwise (and for undilated convs) it is the plain conv on a channels-last input, so FLOP counts are
    those of the dilated conv; DACB's 3D inference path takes the sub-grids itself (``DACB.sub_grid_inference``).
    With gradients and ``fast_backward`` the undilated convs compute their input gradient as a forward conv
    (:func:`depthwise_conv`).
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    dilation = sub_grid_dilation(conv, x) if needs_grad else None
    if dilation is not None:
        return dilated_depthwise_conv(conv, x, dilation, fast_backward)
    x = to_channels_last(x)
    y = depthwise_conv_module(conv, x) if fast_backward and needs_grad else None
    return conv(x) if y is None else y


class DACB(nn.Module):
    """Dilated Attention Convolution Block, official ``DACB(in_c=C, emb_dim=E)``.

    Three parallel depthwise 3x3(x3) convs (bias) with dilation 1, 2, 3, each followed by GroupNorm(C groups) and its
    own PReLU; concat (3C) -> 1x1 conv-IN-PReLU 3C -> E -> 1x1 conv-IN-PReLU E -> C; ``+ x``; InstanceNorm
    (affine=False); PReLU. ``self.unused_prelu`` mirrors a PReLU the official block creates but never calls, kept
    (frozen) so that the parameter count matches (1 parameter). Kernels are 1 on axes where the plan's kernel is 1.
    On CPU the dilated depthwise convs go through :func:`depthwise_conv_cpu` (same result, much faster).
    ``(B, C, *S) -> (B, C, *S)``.

    Speed (``fast_inference``): in CPU inference the block runs channels-last; every norm and PReLU overwrites the
    map it normalises (:func:`norm_act_on_fresh`; ``nn.InstanceNorm`` first copies a channels-last map to NCDHW),
    the 3C-wide concatenation is never formed (the first 1x1 conv sums one GEMM per branch) and the residual sum is
    in place.

    Speed (``fast_depthwise_backward``): in CPU training the depthwise convs compute their input gradient as a
    forward conv (:func:`depthwise_conv_cpu`).

    Speed (``parts_training``): in CPU training the three branches stay in the block's layout (NC(D)HW in GLIMS's
    training) and the first 1x1 conv sums one GEMM per branch (:meth:`ConvNormAct.forward_on_parts`): the 3C-wide
    concatenation is never formed, and each branch's gradient arrives contiguous, in its own output's layout.

    Speed (``sub_grid_inference``): in 3D CPU inference the dilated convs run as undilated convs on their interleaved
    sub-grids (:mod:`~nnunetv2_lgms.networks.sub_grids`, as CPU training always does). At the Hippocampus plan's
    level 0 (9 x 24 x 40 x 56 x 40) the dilation-2 and -3 convs took 171 and 152 ms against 598 and 333 ms
    (channels-last, 2 cores of an AMD EPYC with AVX2).
    """

    fast_inference: bool = True
    fast_depthwise_backward: bool = True
    sub_grid_inference: bool = True
    parts_training: bool = True

    def __init__(self, conv_op: Type[_ConvNd], channels: int, emb_dim: int,
                 plan_kernel: Optional[Sequence[int]] = None, dilations: Sequence[int] = (1, 2, 3)):
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)
        kernel = restrict_kernel(3, plan_kernel or (3,) * dim)
        self.dilated_convs = nn.ModuleList(
            conv_op(channels, channels, kernel, padding=same_padding(kernel, d), dilation=d, groups=channels,
                    bias=True) for d in dilations)
        self.dilated_norms = nn.ModuleList(nn.GroupNorm(channels, channels) for _ in dilations)
        self.dilated_acts = nn.ModuleList(ScalarPReLU(inplace=True) for _ in dilations)
        self.compress = nn.Sequential(conv_in_prelu(conv_op, len(dilations) * channels, emb_dim),
                                      conv_in_prelu(conv_op, emb_dim, channels))
        self.norm = layout_keeping(instance_norm_for(conv_op))(channels)
        self.act = ScalarPReLU(inplace=True)
        self.unused_prelu = nn.PReLU()  # official dead parameter, never used in forward
        # frozen so that DDP (which fails on parameters that never receive a gradient) and optimisers ignore it;
        # it still counts towards the parameter total, as in the official model
        self.unused_prelu.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_inference and cpu_inference_path(x):
            return self._forward_cpu_inference(x)
        cpu = x.device.type == "cpu"
        branches = [act(norm(self._depthwise_training(conv, x) if cpu else conv(x)))
                    for conv, norm, act in zip(self.dilated_convs, self.dilated_norms, self.dilated_acts)]
        first, second = self.compress
        y = first.forward_on_parts(branches) if self.parts_training and cpu else None
        y = second(first(torch.cat(branches, dim=1)) if y is None else y)
        return self.act(self.norm(y + x))

    def _depthwise_training(self, conv: _ConvNd, x: torch.Tensor) -> torch.Tensor:
        y = depthwise_conv_cpu(x, conv, self.fast_depthwise_backward)
        # (the undilated conv runs channels-last; its output goes back to the block's layout before the norm)
        return in_memory_format_of(y, x) if self.parts_training else y

    def _forward_cpu_inference(self, x: torch.Tensor) -> torch.Tensor:
        x = to_channels_last(x)
        branches = [norm_act_on_fresh(self._depthwise_inference(conv, x), [norm, act])
                    for conv, norm, act in zip(self.dilated_convs, self.dilated_norms, self.dilated_acts)]
        first, second = self.compress
        y = first.forward_on_parts(branches)
        y = second(first(torch.cat(branches, dim=1)) if y is None else y)
        if y.dtype != x.dtype or y.stride() != x.stride():  # (float64, or a layout the GEMMs did not give)
            return self.act(self.norm(y + x))
        return norm_act_on_fresh(y.add_(x), [self.norm, self.act])

    def _depthwise_inference(self, conv: _ConvNd, x: torch.Tensor) -> torch.Tensor:
        # 3D only: in 2D oneDNN's dilated depthwise conv on a channels-last map was about as fast as the undilated
        # one (level 0 of the 2D plan, 12 x 24 x 256 x 256: 46 against 35 ms; on sub-grids 121 ms)
        dilation = sub_grid_dilation(conv, x) if self.sub_grid_inference and x.ndim == 5 else None
        return conv(x) if dilation is None else dilated_depthwise_conv(conv, x, dilation)


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

    Speed (``skip_constant_spatial_gate``): the faithful gate is computed as what it is, ``sigmoid(PReLU(beta))``
    with ``beta`` the LayerNorm's bias, without the channel max/mean maps, the 7-tap conv and the LayerNorm, whose
    results it discards. Exact: over one channel ``x - mean(x) = 0``, so the LayerNorm returns ``beta`` and its
    backward passes exactly zero to the conv, to ``x`` and to its own weight; a zero-times-parameters term gives the
    conv and LayerNorm weights those zero gradients (not None), as the full computation does, so optimisers (weight
    decay) treat them alike. At GLIMS's level 0 of the Hippocampus plan the conv's backward alone took 0.6-0.8 s of
    a training step (2 cores).
    """

    skip_constant_spatial_gate: bool = True

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
        return self._spatial_gate(x).expand(x.shape[0], 1, *x.shape[2:])

    def _spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial gate, ``(B, 1, *S)``, or ``(1, 1, 1, ...)`` where it is one constant."""
        norm = self.spatial_norm
        if (self.skip_constant_spatial_gate and norm is not None and tuple(norm.normalized_shape) == (1,)
                and norm.weight is not None and norm.bias is not None
                and not is_counting_flops()):  # (the architecture's FLOPs are reported)
            zero = (self.spatial_conv.weight.sum() + norm.weight.sum()) * 0
            return torch.sigmoid(self.spatial_act((norm.bias + zero).view(1, 1, *(1,) * (x.ndim - 2))))
        y = self.spatial_conv(torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1))
        if norm is not None:
            y = norm(y.movedim(1, -1)).movedim(-1, 1)
        return torch.sigmoid(self.spatial_act(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if can_overwrite_intermediates(x):  # one full-size product fewer
            return (x * self._spatial_gate(x)).mul_(self.channel_gate(x))
        return x * (self.channel_gate(x) * self._spatial_gate(x))


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
        up = self.up(x)
        fused = None
        if self.fuse.norm_in_place and cpu_inference_path(up):  # no [up, skip] concatenation
            fused = self.fuse.forward_on_parts([up, to_channels_last(skip)])
        return self.blocks(self.fuse(torch.cat([up, skip], dim=1)) if fused is None else fused)
