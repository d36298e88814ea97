"""Accelerated modules for training on CPU (setting ``cpu_training``).

Each class subclasses a reference module and runs the kernels of :mod:`~nnunetv2_lgms.acceleration.cpu_kernels`
where :func:`applies` holds (CPU, autograd on, eager); everywhere else it hands the call to the reference. The
reasons are measurements on 2 cores of an AMD EPYC (AVX2), quoted with each kernel; equality with the reference,
forward and backward, is tested in ``tests/test_acceleration.py``.

LGMSNet trains channels-last from end to end (:class:`LGMSNet`, :class:`LGMSNetEncoder`, :class:`SparseTransformer`,
the InstanceNorms): oneDNN's depthwise and narrow convs, and their backward, are much faster on channels-last maps
(the Hippocampus training step 1.23x faster than in NCDHW; the LMS depthwise stage 2.2-2.5x). GLIMS trains in
NC(D)HW, where its per-channel norms are fastest, with its 1x1 convs as batched GEMMs and its dilated depthwise convs
on sub-grids (:mod:`~nnunetv2_lgms.acceleration.sub_grids`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

from nnunetv2_lgms.acceleration.cpu_kernels import (conv2d_gemm_weight_grad, conv2d_gemm_weight_grad_module,
                                                    depthwise_conv_module, group_norm_channels_last,
                                                    in_memory_format_of, is_channels_last, is_compiling,
                                                    merged_depthwise_conv2d, pointwise_conv, pointwise_pair_applies,
                                                    pointwise_pair_blockwise, scalar_prelu, to_channels_last)
from nnunetv2_lgms.acceleration.registry import register
from nnunetv2_lgms.acceleration.sub_grids import dilated_depthwise_conv, sub_grid_dilation
from nnunetv2_lgms.networks import attention, common, glims, glims_blocks, lgms_blocks, lgmsnet

SETTING = "cpu_training"


def applies(x: torch.Tensor) -> bool:
    """The guard of every class here: a CPU tensor, autograd on, not traced by ``torch.compile``."""
    return x.device.type == "cpu" and torch.is_grad_enabled() and not is_compiling()


def prelu_after_norm(act: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``act(y)`` for a PReLU that directly follows a norm (whose backward does not need its output): one slope
    through :func:`~nnunetv2_lgms.acceleration.cpu_kernels.scalar_prelu`, in place."""
    out = scalar_prelu(y, act.weight, in_place=True) if isinstance(act, nn.PReLU) else None
    return act(y) if out is None else out


# --- shared blocks ---------------------------------------------------------------------------------------------------

class _InstanceNorm:
    """InstanceNorm without running statistics: on a channels-last map it stays channels-last
    (:func:`~nnunetv2_lgms.acceleration.cpu_kernels.group_norm_channels_last`; ``nn.InstanceNorm`` copies the map to
    NC(D)HW and returns that layout); on a contiguous map it runs as ``F.group_norm`` with one group per channel,
    whose output is its own (``nn.InstanceNorm`` returns a view, so an in-place activation after it made autograd
    copy the gradient) and which was faster (GLIMS's level 0: 64-78 against 74-89 ms forward + backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (applies(x) and not self.track_running_stats and x.ndim == self._get_no_batch_dim() + 1):
            return super().forward(x)
        y = None
        if is_channels_last(x):
            y = group_norm_channels_last(x, x.shape[1], self.weight, self.bias, self.eps)
        elif not torch.is_autocast_enabled("cpu") and x.is_contiguous() and x.shape[2:].numel() > 1:
            y = F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)
        return super().forward(x) if y is None else y


@register(nn.InstanceNorm2d, SETTING)
class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    pass


@register(nn.InstanceNorm3d, SETTING)
class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    pass


@register(common.ConvNormAct, SETTING)
class ConvNormAct(common.ConvNormAct):
    """A 1x1 conv on an NC(D)HW map as batched GEMMs (:func:`~nnunetv2_lgms.acceleration.cpu_kernels.pointwise_conv`;
    GLIMS); a wide 2D conv on a channels-last map with its weight gradient as one GEMM per kernel tap
    (:func:`~nnunetv2_lgms.acceleration.cpu_kernels.conv2d_gemm_weight_grad`; LGMSNet-2D); a PReLU after the norm
    in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x):
            return super().forward(x)
        y = pointwise_conv(self[0], x)
        if y is None:
            y = conv2d_gemm_weight_grad_module(self[0], x)
        return self.after_conv(self[0](x) if y is None else y)

    def after_conv(self, y: torch.Tensor) -> torch.Tensor:
        """The layers after the conv, on its output ``y``."""
        layers = list(self)[1:]
        for i, layer in enumerate(layers):
            after_norm = i > 0 and isinstance(layers[i - 1], (nn.modules.instancenorm._InstanceNorm, nn.GroupNorm))
            y = prelu_after_norm(layer, y) if after_norm else layer(y)
        return y

    def forward_on_parts(self, parts: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """``self(torch.cat(parts, dim=1))`` for a 1x1 conv, one GEMM per part summed in place, so the
        concatenation is never formed; None where that does not apply (nothing computed then)."""
        y = pointwise_conv(self[0], parts) if applies(parts[0]) else None
        return None if y is None else self.after_conv(y)


# --- LGMSNet -----------------------------------------------------------------------------------------------------

@register(lgmsnet.LGMSNet, SETTING)
class LGMSNet(lgmsnet.LGMSNet):
    """Channels-last from end to end; contiguous (NC(D)HW) outputs."""

    def forward(self, x: torch.Tensor):
        if not applies(x):
            return super().forward(x)
        out = super().forward(to_channels_last(x))
        return [o.contiguous() for o in out] if isinstance(out, list) else out.contiguous()


@register(lgmsnet.LGMSNetEncoder, SETTING)
class LGMSNetEncoder(lgmsnet.LGMSNetEncoder):
    """The stem's output channels-last (a one-channel input is channels-last and contiguous at once, so the stem
    conv's output is not)."""

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if not applies(x):
            return super().forward(x)
        return self.levels(to_channels_last(self.stem(x)))


@register(lgms_blocks.LocalMultiscaleBlock, SETTING)
class LocalMultiscaleBlock(lgms_blocks.LocalMultiscaleBlock):
    """The depthwise stage channels-last; in 2D its four convs as one with zero-padded kernels
    (:func:`~nnunetv2_lgms.acceleration.cpu_kernels.merged_depthwise_conv2d`), in 3D each with its input gradient as
    a forward conv (:func:`~nnunetv2_lgms.acceleration.cpu_kernels.depthwise_conv`: at the Hippocampus plan's level
    0 the block's forward + backward 1.6-2.3 s -> 1.3-1.75 s); the two residual sums in place (neither the depthwise
    conv's nor SiLU's backward needs its output)."""

    def multiscale(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x):
            return super().multiscale(x)
        x = to_channels_last(x)
        if x.ndim == 4:
            return merged_depthwise_conv2d(x, [c.weight for c in self.depthwise], [c.bias for c in self.depthwise])
        parts = []
        for conv, part in zip(self.depthwise, x.split(self.chunk, dim=1)):
            y = depthwise_conv_module(conv, part)
            parts.append(conv(part) if y is None else y)
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x):
            return super().forward(x)
        multiscale = in_memory_format_of(self.multiscale(x), x)
        if multiscale.dtype != x.dtype:  # (autocast: an in-place sum would keep the lower precision)
            return self.expand(self.reduce(self.act(self.norm(multiscale + x)))) + x
        out = self.expand(self.reduce(self.act(self.norm(multiscale.add_(x)))))
        return out.add_(x) if out.dtype == x.dtype else out + x


@register(lgms_blocks.FusionConv, SETTING)
class FusionConv(lgms_blocks.FusionConv):
    """BatchNorm -> 1x1 -> GELU -> BatchNorm -> 1x1 as one blockwise autograd function that keeps one 4x-wide map
    instead of six (:func:`~nnunetv2_lgms.acceleration.cpu_kernels.pointwise_pair_blockwise`); with ``[skip, up]``
    as parts (:meth:`forward_parts`) the concatenation is never formed either."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x):
            return super().forward(x)
        (conv, act, _), _, _ = self
        return self._pointwise_pair(act(conv(x)))

    def _pointwise_pair(self, x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        (_, _, norm), expand, reduce = self
        y = pointwise_pair_blockwise(x, expand[0], expand[1], expand[2], reduce[0], input_norm=norm)
        if y is None:
            return reduce(expand(norm(x if isinstance(x, torch.Tensor) else torch.cat(list(x), dim=1))))
        return reduce[2](reduce[1](y))

    def forward_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """``self(torch.cat(parts, dim=1))``. The first conv has one group per part, so each part gets its own dense
        conv + GELU, and the blockwise 1x1 stack sums one GEMM per part. At nnU-Net's 2D plan's level 0 (two 12 x 16
        x 256 x 256 parts) the two dense convs took 229-242 ms forward + backward against 300-305 ms for the
        concatenation and the 2-group conv."""
        (conv, act, norm), expand, reduce = self
        groups = conv.groups
        if not (applies(parts[0]) and len(parts) == groups and conv.in_channels == conv.out_channels
                and not isinstance(conv.padding, str) and conv.padding_mode == "zeros"
                and all(p.shape[1] == conv.in_channels // groups for p in parts)
                and pointwise_pair_applies(parts, expand[0], expand[1], expand[2], reduce[0], input_norm=norm)):
            return self(torch.cat(list(parts), dim=1))
        conv_nd = F.conv2d if conv.weight.ndim == 4 else F.conv3d
        per_group = conv.out_channels // groups
        activated = []
        for g, part in enumerate(parts):
            rows = slice(g * per_group, (g + 1) * per_group)
            weight, bias = conv.weight[rows], None if conv.bias is None else conv.bias[rows]
            y = conv2d_gemm_weight_grad(part, weight, bias, conv.padding, conv.stride, conv.dilation)
            activated.append(act(conv_nd(part, weight, bias, conv.stride, conv.padding, conv.dilation, 1)
                                 if y is None else y))
        return self._pointwise_pair(activated)


@register(lgmsnet.LGMSNetDecoder, SETTING)
class LGMSNetDecoder(lgmsnet.LGMSNetDecoder):
    """Hands ``[skip, up]`` to a leading FusionConv as parts (:meth:`FusionConv.forward_parts`)."""

    def fuse(self, level: int, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        stage = self.stages[level]
        if isinstance(stage, FusionConv):
            first, rest = stage, []
        elif isinstance(stage, nn.Sequential) and isinstance(stage[0], FusionConv):
            first, rest = stage[0], list(stage)[1:]
        else:
            return super().fuse(level, skip, up)
        if not applies(skip):
            return super().fuse(level, skip, up)
        x = first.forward_parts([skip, up])
        for module in rest:
            x = module(x)
        return x


@register(attention.MultiHeadSelfAttention, SETTING)
class MultiHeadSelfAttention(attention.MultiHeadSelfAttention):
    """Heads narrower than 16 channels enter ``F.scaled_dot_product_attention`` zero-padded to 16 (queries, keys and
    values; the scale stays ``head_dim ** -0.5``, the padded output channels are dropped): the zeros add nothing to
    any dot product, but PyTorch's CPU flash kernel ran faster on them (LGMSNet-2D's level-2 attention at nnU-Net's
    2D plan, 48 x 4 heads x 1024 tokens: 932 -> 645 ms forward + backward; head widths of 16 and more lost when
    padded further; sequences under ``pad_min_tokens`` are not padded, the copy costing more than it saved). Other
    heads get dense operands (one copy; 15-20 % faster than on the strided views)."""

    PADDED_HEAD_DIM = 16
    pad_min_tokens = 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (applies(x) and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")):
            return super().forward(x)
        qkv = self.qkv(x)
        if self.head_dim < self.PADDED_HEAD_DIM and x.shape[1] >= self.pad_min_tokens:
            q, k, v = F.pad(qkv, (0, self.PADDED_HEAD_DIM - self.head_dim)).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)[..., :self.head_dim]
        else:
            q, k, v = qkv.contiguous().unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)
        return self.project(out)


@register(attention.SparseTransformer, SETTING)
class SparseTransformer(attention.SparseTransformer):
    """Hands a channels-last map back channels-last (one copy either way), so the network stays channels-last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (applies(x) and x.shape[1] > 1 and x.stride(1) == 1):
            return super().forward(x)
        spatial = tuple(x.shape[2:])
        d = len(spatial)
        p = attention.sparse_patch_size(spatial, (self.patch_size,) * d)
        tokens = self.layers(attention.to_sparse_tokens(x, p))
        n = [s // q for s, q in zip(spatial, p)]
        y = tokens.reshape(-1, *p, *n, tokens.shape[-1])  # B, p..., n..., C
        y = y.permute(0, *[v for i in range(d) for v in (1 + d + i, 1 + i)], 1 + 2 * d)  # B, n0, p0, n1, p1, ..., C
        return y.reshape(y.shape[0], *spatial, y.shape[-1]).movedim(-1, 1)


# --- GLIMS -------------------------------------------------------------------------------------------------------

@register(glims_blocks.StridedConvINPReLU, SETTING)
class StridedConvINPReLU(glims_blocks.StridedConvINPReLU):
    """The PReLU after the norm in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x):
            return super().forward(x)
        conv, norm, act = self
        return prelu_after_norm(act, norm(conv(x)))


@register(glims_blocks.DACB, SETTING)
class DACB(glims_blocks.DACB):
    """Dilated depthwise convs as undilated convs on sub-grids (oneDNN's CPU kernels for dilated depthwise convs,
    and their backward, are slow: ~15 s forward and ~25 s backward for a 3x3x3 dilation-2 conv on 2 x 24 x 40 x 56 x
    40), every depthwise conv with its input gradient as a forward conv, in the block's layout; the first 1x1 conv
    summing one GEMM per branch, so the 3C-wide concatenation is never formed (Hippocampus step 30.7 -> 23.5 s);
    the PReLUs after norms in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x):
            return super().forward(x)
        branches = [prelu_after_norm(act, norm(self._depthwise(conv, x)))
                    for conv, norm, act in zip(self.dilated_convs, self.dilated_norms, self.dilated_acts)]
        first, second = self.compress
        y = first.forward_on_parts(branches) if isinstance(first, ConvNormAct) else None
        y = second(first(torch.cat(branches, dim=1)) if y is None else y)
        return prelu_after_norm(self.act, self.norm(y + x))

    @staticmethod
    def _depthwise(conv: _ConvNd, x: torch.Tensor) -> torch.Tensor:
        needs_grad = x.requires_grad or conv.weight.requires_grad
        dilation = sub_grid_dilation(conv, x) if needs_grad else None
        if dilation is not None:
            y = dilated_depthwise_conv(conv, x, dilation)
        else:
            x_last = to_channels_last(x)
            y = depthwise_conv_module(conv, x_last) if needs_grad else None
            y = conv(x_last) if y is None else y
        # (the undilated conv runs channels-last; its output goes back to the block's layout before the norm)
        return in_memory_format_of(y, x)


@register(glims_blocks.CSAB, SETTING)
class CSAB(glims_blocks.CSAB):
    """The faithful (degenerate) spatial gate computed as what it is, ``sigmoid(PReLU(beta))`` with ``beta`` the
    one-channel LayerNorm's bias (over one channel ``x - mean(x) = 0``, so the LayerNorm returns ``beta`` and passes
    exactly zero gradient to the conv, to ``x`` and to its own weight), without the channel max/mean maps, the 7-tap
    conv and the LayerNorm. A zero-times-parameters term gives the conv and LayerNorm weights their zero gradients
    (not None), as the full computation does. At GLIMS's level 0 of the Hippocampus plan the conv's backward alone
    took 0.6-0.8 s of a training step. The product with the channel gate stays ``(B, C, 1, ...)`` before it meets
    ``x`` (one full-size product)."""

    def _constant_gate(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The degenerate gate as a ``(1, 1, 1, ...)`` tensor, or None where the shortcut does not apply."""
        norm = self.spatial_norm
        if not (applies(x) and norm is not None and tuple(norm.normalized_shape) == (1,)
                and norm.weight is not None and norm.bias is not None):
            return None
        zero = (self.spatial_conv.weight.sum() + norm.weight.sum()) * 0
        return torch.sigmoid(self.spatial_act((norm.bias + zero).view(1, 1, *(1,) * (x.ndim - 2))))

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        gate = self._constant_gate(x)
        return super().spatial_gate(x) if gate is None else gate.expand(x.shape[0], 1, *x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self._constant_gate(x)
        return super().forward(x) if gate is None else x * (self.channel_gate(x) * gate)


@register(glims.GLIMSDecoder, SETTING)
class GLIMSDecoder(glims.GLIMSDecoder):
    """The 1x1 heads as batched GEMMs on the NC(D)HW maps (oneDNN reorders such maps for a 1x1 conv)."""

    def head(self, level: int, x: torch.Tensor) -> torch.Tensor:
        y = pointwise_conv(self.seg_layers[level], x) if applies(x) else None
        return super().head(level, x) if y is None else y
