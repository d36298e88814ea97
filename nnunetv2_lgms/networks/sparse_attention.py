"""The sparse Transformer of LGMSNet's Global Multiscale block (LGMSNet paper §3.3, Eq. 6; official
``MobileViTBlocktem_CT``).

A feature map is cut into ``prod(p)`` interleaved sub-grids ("sparse" sampling with stride ``p`` per axis); each
sub-grid is one token sequence, a token being one pixel/voxel with its channels as features. Attention is therefore
global over a ``p``-times subsampled grid, and the ``prod(p)`` sequences share weights like an extra batch axis.
There is no positional encoding (as in the official code).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_lgms.flops import is_counting_flops
from nnunetv2_lgms.networks.blocks import has_channels_last_strides
from nnunetv2_lgms.networks.cpu_inference import activation_in_place, can_overwrite_intermediates


def sparse_patch_size(spatial_size: Sequence[int], patch_size: Sequence[int]) -> Tuple[int, ...]:
    """Per-axis sub-sampling stride: ``patch_size`` where the axis divides evenly, else 1.

    The official code requires every axis to be divisible by 2 here; nnU-Net plans produce odd maps such as 5x7x6, so
    such axes fall back to stride 1 (all voxels of that axis in the same sequence)."""
    return tuple(p if s % p == 0 else 1 for s, p in zip(spatial_size, patch_size))


def to_sparse_tokens(x: torch.Tensor, p: Sequence[int]) -> torch.Tensor:
    """``(B, C, *S) -> (B * prod(p), prod(S / p), C)``; sequence index = intra-patch offset, token = sub-grid cell.
    One copy, whatever ``x``'s memory format."""
    b, c, *spatial = x.shape
    n = [s // q for s, q in zip(spatial, p)]
    d = len(spatial)
    x = x.movedim(1, -1).reshape(b, *[v for pair in zip(n, p) for v in pair], c)  # B, n0, p0, n1, p1, ..., C
    x = x.permute(0, *[2 + 2 * i for i in range(d)], *[1 + 2 * i for i in range(d)], 1 + 2 * d)  # B, p..., n..., C
    return x.reshape(b * math.prod(p), math.prod(n), c)


def from_sparse_tokens(tokens: torch.Tensor, spatial_size: Sequence[int], p: Sequence[int],
                       channels_last: bool = False) -> torch.Tensor:
    """Inverse of :func:`to_sparse_tokens`: ``(B * prod(p), prod(S / p), C) -> (B, C, *S)``, contiguous or (with
    ``channels_last``) in channels-last memory format; one copy either way."""
    d = len(spatial_size)
    c = tokens.shape[-1]
    n = [s // q for s, q in zip(spatial_size, p)]
    x = tokens.reshape(-1, *p, *n, c)  # B, p..., n..., C
    if channels_last:
        x = x.permute(0, *[v for i in range(d) for v in (1 + d + i, 1 + i)], 1 + 2 * d)  # B, n0, p0, ..., C
        return x.reshape(x.shape[0], *spatial_size, c).movedim(-1, 1)
    x = x.permute(0, 1 + 2 * d, *[v for i in range(d) for v in (1 + d + i, 1 + i)])  # B, C, n0, p0, n1, p1, ...
    return x.reshape(x.shape[0], c, *spatial_size)


class MultiHeadSelfAttention(nn.Module):
    """Softmax attention with an inner width of ``heads * head_dim`` that differs from the token width
    (official: 4 heads x 8 = 32 for tokens of 96 or 48 channels). ``(N, L, dim) -> (N, L, dim)``.

    Speed (``pad_head_dim``): on CPU, heads narrower than 16 channels enter ``F.scaled_dot_product_attention``
    zero-padded to 16 (queries, keys and values; the scale stays ``head_dim ** -0.5``, the padded output channels are
    dropped). The zeros add nothing to any dot product, so the result is the same, but PyTorch's CPU flash kernel ran
    faster on the padded heads. LGMSNet-2D's level-2 attention at nnU-Net's 2D plan (48 sequences x 4 heads x 1024
    tokens, head_dim 8; 2 cores of an AMD EPYC, AVX2) took 157 instead of 240 ms forward and 645 instead of 932 ms
    forward + backward; head_dim 4 and 12 gained too, 16 and wider lost when padded further. Only for sequences of
    at least ``pad_min_tokens`` (on 64 tokens the copy cost more than it saved) and not while FLOPs are counted.
    """

    pad_head_dim: bool = True
    pad_min_tokens: int = 128
    PADDED_HEAD_DIM = 16

    def __init__(self, dim: int, heads: int = 4, head_dim: int = 8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        qkv = self.to_qkv(x).view(n, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self._pads_heads(x):
            # one copy, as below, into dense (3, N, heads, L, 16) operands whose last 16 - head_dim channels are 0
            q, k, v = F.pad(qkv, (0, self.PADDED_HEAD_DIM - self.head_dim)).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)[..., :self.head_dim]
        else:
            if x.device.type == "cpu":
                # PyTorch's CPU flash kernel ran 15-20 % faster (forward and backward, head_dim 8, 1024 tokens) on
                # dense (N, heads, L, head_dim) operands than on these strided views; one copy makes all three dense
                qkv = qkv.contiguous()
            q, k, v = qkv.unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)  # default scale head_dim ** -0.5, as in the official code
        return self.to_out(out.transpose(1, 2).reshape(n, length, self.heads * self.head_dim))

    def _pads_heads(self, x: torch.Tensor) -> bool:
        return (self.pad_head_dim and x.device.type == "cpu" and self.head_dim < self.PADDED_HEAD_DIM
                and x.shape[1] >= self.pad_min_tokens and x.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu") and not is_counting_flops())


class SparseTransformerLayer(nn.Module):
    """One pre-norm Transformer layer: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))`` with a SiLU MLP.

    Speed (``in_place_inference``): without autograd, the two residual sums and the MLP's activation overwrite the
    layer's own fresh tensors (the same values: the sums commute) instead of allocating new token maps. LGMSNet-2D's
    level-2 Transformer at nnU-Net's 2D plan (48 x 1024 tokens of 48 channels): 243 -> 237 ms (medians of 8
    interleaved calls, 2 cores), nearly all of it in the attention itself."""

    in_place_inference: bool = True

    def __init__(self, dim: int, mlp_dim: int, heads: int = 4, head_dim: int = 8):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = MultiHeadSelfAttention(dim, heads, head_dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.SiLU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_place_inference and can_overwrite_intermediates(x):
            y = self.attention(self.attention_norm(x))
            x = y.add_(x) if y.dtype == x.dtype else x + y
            expand, act, project = self.mlp
            y = project(activation_in_place(act, expand(self.mlp_norm(x))))
            return y.add_(x) if y.dtype == x.dtype else x + y
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class SparseTransformer(nn.Module):
    """Feature map in, feature map out: ``(B, C, *S) -> (B, C, *S)`` through sparse tokens; the output keeps the
    input's memory format (channels-last or contiguous), so the networks' channels-last CPU path stays so."""

    def __init__(self, dim: int, mlp_dim: int, depth: int = 1, heads: int = 4, head_dim: int = 8,
                 patch_size: int = 2):
        super().__init__()
        self.patch_size = patch_size
        self.layers = nn.Sequential(*[SparseTransformerLayer(dim, mlp_dim, heads, head_dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        p = sparse_patch_size(spatial, (self.patch_size,) * len(spatial))
        tokens = self.layers(to_sparse_tokens(x, p))
        return from_sparse_tokens(tokens, spatial, p, channels_last=has_channels_last_strides(x))
