"""LGMSNet's blocks (arXiv 2508.15476 §3.2-3.4), following the official code where it differs from the paper
(see README, "Deviations"). Every block serves 2D and 3D through ``conv_op``."""
from __future__ import annotations

from typing import Optional, Sequence, Type

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim

from nnunetv2_lgms.flops import is_counting_flops
from nnunetv2_lgms.networks.blocks import (ConvNormAct, batch_norm_affine, batch_norm_for, conv_then,
                                           derived_for_inference, fold_batch_norm_after, foldable_batch_norm,
                                           in_memory_format_of,
                                           interpolate_to, norm_act_on_fresh, restrict_kernel, same_padding,
                                           to_channels_last)
from nnunetv2_lgms.networks.cpu_inference import (can_overwrite_intermediates, conv_act_fused, is_compiling,
                                                  per_sample_norm_act_, pixels_dense, pointwise_convs_blockwise)
from nnunetv2_lgms.networks.cpu_training import (conv2d_gemm_weight_grad, depthwise_conv_module,
                                                 pointwise_pair_applies, pointwise_pair_blockwise)
from nnunetv2_lgms.networks.sparse_attention import SparseTransformer


class LocalMultiscaleBlock(nn.Module):
    """LMS block (§3.2): depthwise convs with kernels 3/5/7/9 on four channel groups, then a bottleneck.

    ``x' = GELU(GN_4(concat_k DW_k(x_k) + x))``; ``out = expand(reduce(x')) + x`` with ``reduce`` a 1x1 conv to C/4
    and ``expand`` a 3x3 conv back to C (both norm + SiLU). Shapes: ``(B, C, *S) -> (B, C, *S)``; C must be a
    multiple of the number of kernels (4).

    Speed (``channels_last_depthwise``): on CPU, when gradients are needed, the depthwise stage runs in
    channels-last memory format whatever the input's format. PyTorch's CPU backward of these depthwise convs (4-8
    channels per kernel) is much faster in channels-last; measured on 2 cores, the 3D training step on the
    Hippocampus plan was 2.2-2.5x faster in three runs (results/speed_cpu/speed_paths.md). In inference the input's
    format is kept: oneDNN's NCDHW forward of these convs was faster. The math is unchanged; in 3D one conv per
    kernel size stays (a single 9x9x9 conv with zero-padded small kernels was slower; 2D: ``merged_depthwise``).

    Speed (``in_place_inference``): without autograd, the two residual sums, the GroupNorm and the GELU overwrite
    the block's own fresh intermediates instead of allocating new maps (on CPU a fresh multi-megabyte map costs page
    faults: a 50 MB map took 14.5 ms to allocate and fill, 3.7 ms to fill when reused; :func:`norm_act_on_fresh`).
    With ``in_place_training_sums`` the two sums are in place in training too (the GELU is not: its backward needs
    its input); skipped where the dtypes differ (autocast), as an in-place sum would keep the lower precision.

    Speed (``merged_depthwise``): on CPU in 2D, the four depthwise convs run as one depthwise conv over all channels,
    each group's kernel zero-padded to the largest (9x9); its weight is built from the four convs' parameters on
    every call, so gradients reach them as usual. The padded taps double the FLOPs, but the split, the four convs on
    4-channel slices and the concatenation cost more: at nnU-Net's 2D plan (16 channels, batch 12, 256 x 256) the
    stage took 30 ms instead of 85 ms in inference and 301 ms instead of 383 ms forward + backward. Not in 3D (9x9x9
    padding; its backward was 2.6x slower) nor on CUDA (not measured), nor while FLOPs are counted (the architecture's
    FLOPs are reported, :func:`nnunetv2_lgms.flops.count_flops`).

    Speed (``fast_depthwise_backward``): where the four convs run one by one (3D), CPU training computes each conv's
    input gradient as a forward conv with the flipped kernel (:func:`cpu_training.depthwise_conv
    <nnunetv2_lgms.networks.cpu_training.depthwise_conv>`). At the Hippocampus plan's level 0 the block's forward
    + backward went from 1.6-2.3 s to 1.3-1.75 s (four interleaved pairs, 2 cores).
    """

    channels_last_depthwise: bool = True
    in_place_inference: bool = True
    in_place_training_sums: bool = True
    merged_depthwise: bool = True
    fast_depthwise_backward: bool = True

    def __init__(self, conv_op: Type[_ConvNd], channels: int, norm_op: Type[nn.Module],
                 norm_kwargs: Optional[dict] = None, kernel_sizes: Sequence[int] = (3, 5, 7, 9),
                 plan_kernel: Optional[Sequence[int]] = None, group_norm_groups: int = 4):
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)
        plan_kernel = plan_kernel or (3,) * dim
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dw_in = x
        if self.channels_last_depthwise and x.device.type == "cpu" and torch.is_grad_enabled():
            dw_in = to_channels_last(x)
        if self.merged_depthwise and x.ndim == 4 and x.device.type == "cpu" and not is_counting_flops():
            multiscale = self._merged_depthwise(dw_in)
        else:
            parts = dw_in.split(self.chunk, dim=1)
            multiscale = torch.cat([self._depthwise_conv(conv, part) for conv, part in zip(self.depthwise, parts)],
                                   dim=1)
        multiscale = in_memory_format_of(multiscale, x)
        if self.in_place_inference and can_overwrite_intermediates(x):
            # the sums, the norm and the GELU overwrite tensors this block has just created (no new full-size maps)
            y = norm_act_on_fresh(multiscale.add_(x), [self.norm, self.act])
            return self.expand(self.reduce(y)).add_(x)
        if self.in_place_training_sums and multiscale.dtype == x.dtype:
            # with autograd too: neither the depthwise conv's nor SiLU's backward needs its output
            out = self.expand(self.reduce(self.act(self.norm(multiscale.add_(x)))))
            return out.add_(x) if out.dtype == x.dtype else out + x
        y = self.act(self.norm(multiscale + x))
        return self.expand(self.reduce(y)) + x

    def _depthwise_conv(self, conv: _ConvNd, x: torch.Tensor) -> torch.Tensor:
        y = depthwise_conv_module(conv, x) if self.fast_depthwise_backward else None
        return conv(x) if y is None else y

    def _merged_depthwise(self, x: torch.Tensor) -> torch.Tensor:
        """``cat_k DW_k(x_k)`` as one depthwise conv with every kernel zero-padded (centred) to the largest."""
        params = [t for conv in self.depthwise for t in (conv.weight, conv.bias)]
        # the custom backward runs outside autocast: under autocast, autograd differentiates the plain ops instead
        if torch.is_grad_enabled() and not is_compiling() and not torch.is_autocast_enabled(x.device.type):
            return _MergedDepthwiseConv2d.apply(x, *params)
        return _merged_depthwise_forward(x, params[0::2], params[1::2])[0]


def _merged_depthwise_forward(x, weights, biases):
    kernel = [max(w.shape[2 + axis] for w in weights) for axis in range(x.ndim - 2)]
    padded = []
    for w in weights:
        pad = []
        for k_max, k in zip(reversed(kernel), reversed(w.shape[2:])):  # F.pad: last axis first
            pad += [(k_max - k) // 2] * 2
        padded.append(F.pad(w, pad))
    weight, padding = torch.cat(padded), same_padding(kernel)
    return F.conv2d(x, weight, torch.cat(biases), padding=padding, groups=x.shape[1]), weight, padding


class _MergedDepthwiseConv2d(torch.autograd.Function):
    """The merged depthwise conv with autograd. Backward: the input gradient as one depthwise conv with the flipped
    merged kernel (stride 1, centred padding); the weight and bias gradients per kernel group, on channel slices of
    the input and gradient, because oneDNN's depthwise weight gradient costs per tap (with the zero-padded taps it
    took 190 ms at the 2D plan's level 0, per group 126 ms in all)."""

    @staticmethod
    def forward(ctx, x, *params):
        weights, biases = params[0::2], params[1::2]
        out, weight, padding = _merged_depthwise_forward(x, weights, biases)
        ctx.save_for_backward(x, weight, *weights)
        ctx.padding = padding
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *weights = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad_out, weight.flip(-1, -2), padding=ctx.padding, groups=x.shape[1])
        grads, start = [], 0
        for w in weights:
            stop = start + w.shape[0]
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out[:, start:stop], x[:, start:stop], w, [w.shape[0]], [1, 1], same_padding(w.shape[2:]),
                [1, 1], False, [0, 0], w.shape[0], [False, True, True])
            grads += [grad_w, grad_b]
            start = stop
        return (grad_x, *grads)


class DepthwiseConvBranch(nn.Module):
    """The convolutional quarter of the GMS block: ``x + BN(pw(ReLU(BN(DW3(x)))))`` where ``pw`` is a per-channel
    1x1 scale (grouped conv, groups = C). Always BatchNorm, also in 3D (as in the official code)."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int, plan_kernel: Sequence[int]):
        super().__init__()
        norm = batch_norm_for(conv_op)
        kernel = restrict_kernel(3, plan_kernel)
        self.body = nn.Sequential(
            conv_op(channels, channels, kernel, padding=same_padding(kernel), groups=channels, bias=False),
            norm(channels), nn.ReLU(inplace=True),  # in place: the norm's backward does not need its output
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
        dim = convert_conv_op_to_dim(conv_op)
        plan_kernel = plan_kernel or (3,) * dim
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
    """Decoder fusion (CMUNeXt style), activation before norm: 3x3 grouped (2) conv, 1x1 to 4*C_out, 1x1 to C_out,
    each followed by GELU then norm. ``(B, C_in, *S) -> (B, C_out, *S)``.

    Speed (``fold_batch_norm``): in eval mode the BatchNorms of the first two layers are folded into the following
    1x1 convs (``W diag(s)``, ``b + W t``), saving two passes over the widest (4*C_out) maps; same result up to
    rounding. The folded weights are reused until a weight or statistic changes. Each conv's GELU runs as a oneDNN
    post-op on CPU (``ConvNormAct.fuse_activation``).

    Speed (``blockwise_pointwise``): on CPU, in inference with channels-last input, the two 1x1 convs (with their
    GELUs and the last BatchNorm) run block by block over the pixels (:func:`pointwise_convs_blockwise`), so the
    4*C_out-wide map is never allocated in full.

    Speed (``blockwise_training``): on CPU, in training with channels-last input, everything from the first
    BatchNorm to the last 1x1 conv runs as one blockwise autograd function (:func:`pointwise_pair_blockwise`): of
    the 4*C_out-wide maps only the GELU output is stored (autograd would keep three and create three gradients), and
    the first two BatchNorms are folded into the 1x1 convs with their batch statistics; same values, gradients and
    running statistics. Given ``[skip, up]`` as parts (:meth:`forward_parts`), training never forms their
    concatenation either.
    """

    fold_batch_norm: bool = True
    blockwise_pointwise: bool = True
    blockwise_training: bool = True

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, norm_op: Type[nn.Module],
                 norm_kwargs: Optional[dict] = None, plan_kernel: Optional[Sequence[int]] = None):
        plan_kernel = plan_kernel or (3,) * convert_conv_op_to_dim(conv_op)
        kw = dict(norm_op=norm_op, act=nn.GELU, bias=True, norm_kwargs=norm_kwargs, act_first=True)
        super().__init__(
            ConvNormAct(conv_op, in_channels, in_channels, restrict_kernel(3, plan_kernel), groups=2, **kw),
            ConvNormAct(conv_op, in_channels, 4 * out_channels, 1, **kw),
            ConvNormAct(conv_op, 4 * out_channels, out_channels, 1, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._folds():
            return self._forward_training(x) if self.training and self.blockwise_training else super().forward(x)
        folded, out_affine = derived_for_inference(self, self._folded_weights)
        (first, *rest), ((weight, bias), *rest_weights) = self, folded
        x = conv_then(first[0], x, weight, bias, [first[1]], first.fuse_activation)
        y = self._pointwise_blockwise(x, rest_weights, out_affine)
        if y is not None:
            return y
        for layer, (weight, bias) in zip(rest, rest_weights):
            x = conv_then(layer[0], x, weight, bias, [layer[1]], layer.fuse_activation)
        return self[-1][2](x)

    def _forward_training(self, x: torch.Tensor) -> torch.Tensor:
        (conv, act, norm), expand, reduce = self
        x = act(conv(x))
        y = pointwise_pair_blockwise(x, expand[0], expand[1], expand[2], reduce[0], input_norm=norm)
        return reduce[2](reduce[1](y)) if y is not None else reduce(expand(norm(x)))

    def forward_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """``self(torch.cat(parts, dim=1))``: the decoder's ``[skip, upsampled]``.

        On the CPU inference path (``blockwise_pointwise``) the concatenation is never formed: the first conv has
        one group per part, so each part gets its own dense conv (oneDNN's dense convs were about twice as fast as
        its 2-group conv on the concatenation), and the next 1x1 conv sums one GEMM per part."""
        y = None
        if self.blockwise_pointwise and self._folds():
            y = self._forward_parts_blockwise(parts)
        elif self.blockwise_pointwise and not self.training:
            y = self._forward_parts_in_place_norms(parts)
        elif self.training and self.blockwise_training:
            y = self._forward_parts_training(parts)
        return self(torch.cat(list(parts), dim=1)) if y is None else y

    def _forward_parts_training(self, parts: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """The parts path in CPU training: a dense conv + GELU per part (the first conv has one group per part) and
        the blockwise 1x1 stack summing one GEMM per part, so the concatenation (and its gradient's split) is never
        formed. At nnU-Net's 2D plan's level 0 (two 12 x 16 x 256 x 256 parts) the two dense convs took 229-242 ms
        forward + backward against 300-305 ms for the concatenation and the 2-group conv (2 cores). None where the
        blockwise stack does not apply (nothing computed then)."""
        (conv, act, norm), expand, reduce = self
        groups = conv.groups
        if (len(parts) != groups or conv.in_channels != conv.out_channels or isinstance(conv.padding, str)
                or conv.padding_mode != "zeros" or any(p.shape[1] != conv.in_channels // groups for p in parts)
                or not pointwise_pair_applies(parts, expand[0], expand[1], expand[2], reduce[0], input_norm=norm)):
            return None
        conv_nd = F.conv2d if conv.weight.ndim == 4 else F.conv3d
        per_group = conv.out_channels // groups
        activated = []
        for g, part in enumerate(parts):
            rows = slice(g * per_group, (g + 1) * per_group)
            weight, bias = conv.weight[rows], None if conv.bias is None else conv.bias[rows]
            y = (conv2d_gemm_weight_grad(part, weight, bias, conv.padding, conv.stride, conv.dilation)
                 if self[0].gemm_weight_grad else None)  # (it declines 3D parts itself)
            activated.append(act(conv_nd(part, weight, bias, conv.stride, conv.padding, conv.dilation, 1)
                                 if y is None else y))
        y = pointwise_pair_blockwise(activated, expand[0], expand[1], expand[2], reduce[0], input_norm=norm)
        return reduce[2](reduce[1](y)) if y is not None else reduce(expand(norm(torch.cat(activated, dim=1))))

    def _folds(self) -> bool:
        return not self.training and self.fold_batch_norm and all(foldable_batch_norm(layer[2]) for layer in self)

    def _pointwise_blockwise(self, x, rest_weights, out_affine) -> Optional[torch.Tensor]:
        if not self.blockwise_pointwise:
            return None
        return pointwise_convs_blockwise(x, [(w, b, layer[1]) for layer, (w, b) in zip(list(self)[1:], rest_weights)],
                                         out_affine)

    def _forward_parts_blockwise(self, parts: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        first = self[0]
        conv, groups = first[0], first[0].groups
        if (len(parts) != groups or any(p.shape[1] != conv.in_channels // groups for p in parts)
                or not all(pixels_dense(p) for p in parts)):  # checked before any work: the 1x1 stack needs it
            return None
        folded, out_affine = derived_for_inference(self, self._folded_weights)
        (weight, bias), *rest_weights = folded
        per_group = conv.out_channels // groups
        outputs = []
        for g, part in enumerate(parts):
            rows = slice(g * per_group, (g + 1) * per_group)
            y = conv_act_fused(conv, part, weight[rows], None if bias is None else bias[rows], first[1], groups=1)
            if y is None:
                return None
            outputs.append(y)
        return self._pointwise_blockwise(outputs, rest_weights, out_affine)

    def _forward_parts_in_place_norms(self, parts: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """The parts path for InstanceNorm (3D) in CPU inference: a dense conv + GELU per part, each part normalised
        in place with its channels' statistics, the 4x expansion as one GEMM per part block by block
        (:meth:`ConvNormAct.forward_on_parts`), the rest of the stack with in-place norms. None (no state changed)
        where it does not apply."""
        (conv, act, norm), expand, reduce = self
        groups = conv.groups
        if (len(parts) != groups or any(p.shape[1] != conv.in_channels // groups for p in parts)
                or not all(pixels_dense(p) for p in parts)):  # checked before any work
            return None
        per_group = conv.out_channels // groups
        outputs = []
        for g, part in enumerate(parts):
            rows = slice(g * per_group, (g + 1) * per_group)
            y = conv_act_fused(conv, part, conv.weight[rows], None if conv.bias is None else conv.bias[rows], act,
                               groups=1)
            if y is None or per_sample_norm_act_(y, norm, channels=rows) is None:
                return None
            outputs.append(y)
        y = expand.forward_on_parts(outputs)
        return None if y is None else reduce(y)

    def _folded_weights(self):
        """Per layer its conv's weight and bias with the previous layer's eval-mode BatchNorm folded in; and the last
        BatchNorm as (scale, shift)."""
        out, pending = [], None  # the previous layer's BatchNorm, applied through this layer's 1x1 conv
        for conv, _act, norm in self:
            weight, bias = conv.weight, conv.bias
            if pending is not None:
                scale, shift = batch_norm_affine(pending)
                # a 1x1 conv: bias + W @ shift (as a sum, so FlopCounterMode does not count per-weight work)
                bias = bias + (weight.flatten(1) * shift).sum(1)
                weight = weight * scale.reshape(1, -1, *[1] * (weight.ndim - 2))
            out.append((weight, bias))
            pending = norm
        return out, batch_norm_affine(pending)


class UpConv(nn.Module):
    """Linear upsampling to the skip's size, then 3x3 conv (bias) + norm + ReLU. ``(B, C_in, *s) -> (B, C_out, *S)``.

    The official code upsamples by a fixed factor 2; resizing to the skip's size is identical for factor 2 and also
    serves nnU-Net's per-axis strides such as (1, 2, 2).

    Speed (``subpixel_inference``): in 2D CPU inference (no autograd, float32, channels-last, size doubled on both
    axes, the BatchNorm folded), the upsampling and the conv run as one conv of the low-resolution map with four
    output phases ("sub-pixel" conv): bilinear x2 upsampling (``align_corners=False``) is, away from the border,
    ``0.25 / 0.75`` weights on the three nearest input rows, so each output phase ``(2i + p, 2j + q)`` is a 3x3 conv
    of the input with the kernel ``M_p W M_q^T`` (:func:`subpixel_kernel`). Same FLOPs, but no 4x-sized upsampled map
    and a wider conv on a smaller map. The two outermost output rows and columns on each side, where the upsampling
    clamps and the conv pads, are recomputed exactly from strips two input rows or columns wide
    (:func:`subpixel_border_strips`). At nnU-Net's 2D plan (batch 12) the level-0 UpConv (32 x 128 x 128 in) took
    67.6 ms against 81.5 ms, level 1 43.9 against 49.8 ms (medians of 8, 2 cores). The strips matter at the small
    levels: with three-row strips (six output rows, two kept) the level-3 and level-2 UpConvs took 48.7 and 92.3 ms,
    with the two-row strips 39.0 and 78.2 ms (medians of 7, interleaved, 2 cores of an AMD EPYC).
    """

    subpixel_inference: bool = True

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, norm_op: Type[nn.Module],
                 norm_kwargs: Optional[dict] = None, plan_kernel: Optional[Sequence[int]] = None):
        super().__init__()
        plan_kernel = plan_kernel or (3,) * convert_conv_op_to_dim(conv_op)
        self.conv = ConvNormAct(conv_op, in_channels, out_channels, restrict_kernel(3, plan_kernel), norm_op,
                                nn.ReLU, bias=True, norm_kwargs=norm_kwargs)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        y = self._subpixel_forward(x, size) if self.subpixel_inference else None
        return self.conv(interpolate_to(x, size)) if y is None else y

    def _subpixel_forward(self, x: torch.Tensor, size: Sequence[int]) -> Optional[torch.Tensor]:
        if len(self.conv) != 3:  # (built without a norm)
            return None
        conv, norm, act = self.conv
        if not (x.ndim == 4 and tuple(size) == tuple(2 * s for s in x.shape[2:]) and min(x.shape[2:]) >= 3
                and x.device.type == "cpu" and x.dtype == torch.float32 and can_overwrite_intermediates(x)
                and pixels_dense(x) and not is_counting_flops() and type(act) is nn.ReLU
                and not self.training and not norm.training and self.conv.norm_follows_conv
                and self.conv.fold_batch_norm and foldable_batch_norm(norm)
                and tuple(conv.kernel_size) == (3, 3) and tuple(conv.padding) == (1, 1)
                and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros"):
            return None
        (weight, bias), (phase_weight, phase_bias) = derived_for_inference(self, self._subpixel_weights)
        phases = conv_act_fused(conv, x, phase_weight, phase_bias, act)  # (B, 4 C_out, h, w): (p, q, c) channels
        if phases is None:
            return None
        b, (h, w), c = x.shape[0], x.shape[2:], weight.shape[0]
        out = torch.empty((b, c, 2 * h, 2 * w), dtype=x.dtype, memory_format=torch.channels_last)
        out.permute(0, 2, 3, 1).view(b, h, 2, w, 2, c).copy_(
            phases.permute(0, 2, 3, 1).reshape(b, h, w, 2, 2, c).permute(0, 1, 3, 2, 4, 5))
        # the outermost two output rows and columns, exactly (where the upsampling clamps and the conv pads)
        top, bottom, left, right = (F.relu_(s) for s in subpixel_border_strips(x, weight, bias))
        out[:, :, :2], out[:, :, -2:], out[:, :, :, :2], out[:, :, :, -2:] = top, bottom, left, right
        return out

    def _subpixel_weights(self):
        conv, norm, _ = self.conv
        weight, bias = fold_batch_norm_after(conv, norm)
        return (weight, bias), (subpixel_kernel(weight), bias.repeat(4))


def subpixel_border_strips(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """The two outermost output rows and columns of ``conv3x3(upsample_x2(x))`` (bilinear, ``align_corners=False``;
    the conv with ``weight``/``bias`` and zero padding 1), computed exactly from thin strips of ``x`` (B, C, h, w):
    ``(top, bottom, left, right)`` of shapes ``(B, C_out, 2, 2w)``, ``(B, C_out, 2, 2w)``, ``(B, C_out, 2h, 2)``,
    ``(B, C_out, 2h, 2)``.

    Output rows 0 and 1 read upsampled rows 0-2 (and the conv's zero row above), which depend on input rows 0 and 1
    only: the two rows upsampled to four give rows 0-2 exactly (the fourth sees a clamp that the full map has not),
    then one zero row on top and a conv without vertical padding give the two output rows. Likewise at the other
    three sides."""
    h, w = x.shape[2:]

    def rows(part, pad):  # 2 input rows -> upsampled rows (3 kept), one zero row where the conv pads
        up = interpolate_to(part, (4, 2 * w))
        return F.conv2d(F.pad(up[:, :, 1:] if pad[1] else up[:, :, :3], (0, 0, *pad)), weight, bias, padding=(0, 1))

    def cols(part, pad):
        up = interpolate_to(part, (2 * h, 4))
        return F.conv2d(F.pad(up[..., 1:] if pad[1] else up[..., :3], pad), weight, bias, padding=(1, 0))

    return (rows(x[:, :, :2], (1, 0)), rows(x[:, :, -2:], (0, 1)),
            cols(x[..., :2], (1, 0)), cols(x[..., -2:], (0, 1)))


#: rows a (input offset i - 1 + a), columns t (conv tap): the input weights of upsampled row 2i + p + t - 1
_BILINEAR_X2_PHASES = torch.tensor([[[0.75, 0.25, 0.0], [0.25, 0.75, 0.75], [0.0, 0.0, 0.25]],
                                    [[0.25, 0.0, 0.0], [0.75, 0.75, 0.25], [0.0, 0.25, 0.75]]])


def subpixel_kernel(weight: torch.Tensor) -> torch.Tensor:
    """``(C_out, C_in, 3, 3)`` conv applied after bilinear x2 upsampling -> ``(4 C_out, C_in, 3, 3)`` kernels on the
    low-resolution map, output channels ordered (row phase, column phase, C_out), valid away from the border."""
    m = _BILINEAR_X2_PHASES.to(weight)
    return torch.einsum("pat,qbs,octs->pqocab", m, m, weight).reshape(4 * weight.shape[0], *weight.shape[1:])
