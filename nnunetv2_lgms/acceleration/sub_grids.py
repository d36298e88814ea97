"""Dilated depthwise convs as undilated convs on interleaved sub-grids ("space to batch"), for GLIMS's DACB on CPU.

With stride 1, an odd kernel ``k`` and 'same' padding ``h * d`` (``h = (k - 1) // 2``) on an axis of dilation ``d``,
output voxel ``s`` reads the input at ``s + d * (a - h)``, i.e. only voxels of its own residue ``s mod d``. So each
residue class ``x[r::d]`` is convolved on its own, by the undilated kernel with padding ``h``. The ``prod(d)``
classes, stacked along the batch axis, make one undilated depthwise conv. Classes shorter than ``ceil(S / d)`` are
filled up at the end with zeros, exactly what the conv's zero padding reads there, and the outputs there are dropped.
The products and sums are the dilated conv's (equal within float64 tolerance in the tests; identical in float32 at
GLIMS's level 0).

Why: oneDNN's CPU kernels for dilated depthwise convs are slow. At GLIMS's level 0 on the Hippocampus plan (9 x 24 x
40 x 56 x 40, channels-last, no autograd, 2 cores of an AMD EPYC with AVX2) the 3x3x3 conv took 598 ms at dilation
2 and 333 ms at dilation 3, against 171 and 152 ms here (the undilated conv alone: 50 ms); at level 1 89/99 ms
against 12/13 ms. On contiguous maps, and in the backward, the dilated convs were slower still (~15 s and ~25 s at
level 0 on another host).

Memory formats: the sub-grid stack is channels-last; the output has the input's format (channels-last or
contiguous). :func:`to_sub_grids` and :func:`from_sub_grids` are each other's adjoints, which gives their backward.
"""
from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.modules.conv import _ConvNd

from nnunetv2_lgms.acceleration.cpu_kernels import depthwise_conv, is_channels_last


def sub_grid_sizes(size: Sequence[int], dilation: Sequence[int]) -> List[int]:
    """Per axis the length of the longest residue class, ``ceil(S / d)``."""
    return [-(-s // d) for s, d in zip(size, dilation)]


def _residues(dilation: Sequence[int]):
    return itertools.product(*(range(d) for d in dilation))


def _class_index(residue: Sequence[int], dilation: Sequence[int]) -> Tuple[slice, ...]:
    """Index of one residue class in a (B, *S, C) view."""
    return (slice(None),) + tuple(slice(r, None, d) for r, d in zip(residue, dilation))


def to_sub_grids(x: torch.Tensor, dilation: Sequence[int]) -> torch.Tensor:
    """``(B, C, *S) -> (B * prod(d), C, *ceil(S / d))``, channels-last: batch index ``b * prod(d) + r`` (``r`` the
    residue tuple in row-major order) holds ``x[b, :, r0::d0, r1::d1, ...]``, zero-filled at the end of each axis."""
    b, c, *size = x.shape
    m = sub_grid_sizes(size, dilation)
    out = x.new_empty((b, *dilation, *m, c))
    source = x.movedim(1, -1)
    for residue in _residues(dilation):
        part = source[_class_index(residue, dilation)]
        dest = out[(slice(None),) + residue]  # (B, *m, C)
        lengths = part.shape[1:-1]
        dest[(slice(None),) + tuple(slice(0, n) for n in lengths)].copy_(part)
        for axis, (n, full) in enumerate(zip(lengths, m)):
            if n < full:
                dest[(slice(None),) * (1 + axis) + (slice(n, None),)].zero_()
    return out.view(b * math.prod(dilation), *m, c).movedim(-1, 1)


def from_sub_grids(y: torch.Tensor, dilation: Sequence[int], size: Sequence[int],
                   channels_last: bool = True) -> torch.Tensor:
    """Inverse of :func:`to_sub_grids` (the zero-filled ends dropped): ``(B * prod(d), C, *m) -> (B, C, *S)``,
    channels-last or contiguous."""
    groups = math.prod(dilation)
    c, m = y.shape[1], y.shape[2:]
    b = y.shape[0] // groups
    stack = y.movedim(1, -1).reshape(b, *dilation, *m, c)  # a view when ``y`` is channels-last
    if channels_last:
        out_last = y.new_empty((b, *size, c))
        out = out_last.movedim(-1, 1)
    else:
        out = y.new_empty((b, c, *size))
        out_last = out.movedim(1, -1)
    for residue in _residues(dilation):
        dest = out_last[_class_index(residue, dilation)]
        dest.copy_(stack[(slice(None),) + residue + tuple(slice(0, n) for n in dest.shape[1:-1])])
    return out


class _ToSubGrids(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dilation):
        ctx.dilation, ctx.size, ctx.channels_last = dilation, tuple(x.shape[2:]), is_channels_last(x)
        return to_sub_grids(x, dilation)

    @staticmethod
    def backward(ctx, grad):
        return from_sub_grids(grad, ctx.dilation, ctx.size, ctx.channels_last), None


class _FromSubGrids(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, dilation, size, channels_last):
        ctx.dilation = dilation
        return from_sub_grids(y, dilation, size, channels_last)

    @staticmethod
    def backward(ctx, grad):
        return to_sub_grids(grad, ctx.dilation), None, None, None


def sub_grid_dilation(conv: _ConvNd, x: torch.Tensor) -> Optional[Tuple[int, ...]]:
    """Per-axis dilation for :func:`dilated_depthwise_conv` (1 on axes with kernel 1), or None where it does not
    apply: not a stride-1 depthwise conv with odd kernels, zero 'same' padding and some dilation above 1, or an input
    of another rank."""
    kernel = conv.weight.shape[2:]
    if (x.ndim != conv.weight.ndim or conv.transposed or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str) or any(s != 1 for s in conv.stride)
            or not conv.groups == conv.in_channels == conv.out_channels == x.shape[1] or conv.weight.shape[1] != 1):
        return None
    dilation = tuple(d if k > 1 else 1 for d, k in zip(conv.dilation, kernel))
    if all(d == 1 for d in dilation) or any(k % 2 == 0 for k in kernel):
        return None
    if any(p != d * (k - 1) // 2 for p, d, k in zip(conv.padding, dilation, kernel)):
        return None
    return dilation


def dilated_depthwise_conv(conv: _ConvNd, x: torch.Tensor, dilation: Sequence[int],
                           fast_backward: bool = True) -> torch.Tensor:
    """``conv(x)`` for a dilated depthwise conv accepted by :func:`sub_grid_dilation` (``dilation`` its result), as
    an undilated conv on the sub-grid stack; the output has ``x``'s memory format (channels-last or contiguous).
    With autograd, the copies in and out are autograd functions of their own and, with ``fast_backward``, the conv
    is :func:`~nnunetv2_lgms.acceleration.cpu_kernels.depthwise_conv` (input gradient as a forward conv)."""
    dilation = tuple(dilation)
    size, channels_last = tuple(x.shape[2:]), is_channels_last(x)
    padding = [(k - 1) // 2 for k in conv.weight.shape[2:]]
    stack = _ToSubGrids.apply(x, dilation)  # (without autograd: just the copy)
    y = depthwise_conv(stack, conv.weight, conv.bias, padding, [1] * len(size)) if fast_backward else None
    if y is None:  # (no autograd, or not fast_backward)
        y = (F.conv2d if x.ndim == 4 else F.conv3d)(stack, conv.weight, conv.bias, 1, padding, 1, conv.groups)
    return _FromSubGrids.apply(y, dilation, size, channels_last)
