"""The sparse Transformer of LGMSNet's Global Multiscale block (LGMSNet §3.3, Eq. 6; official
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


def sparse_patch_size(spatial_size: Sequence[int], patch_size: Sequence[int]) -> Tuple[int, ...]:
    """Per-axis sub-sampling stride: ``patch_size`` where the axis divides evenly, else 1.

    The official code requires every axis to be divisible by 2 here; nnU-Net plans produce odd maps such as 5x7x6, so
    such axes fall back to stride 1 (all voxels of that axis in the same sequence)."""
    return tuple(p if s % p == 0 else 1 for s, p in zip(spatial_size, patch_size))


def to_sparse_tokens(x: torch.Tensor, p: Sequence[int]) -> torch.Tensor:
    """``(B, C, *S) -> (B * prod(p), prod(S / p), C)``; sequence index = intra-patch offset, token = sub-grid cell."""
    b, c, *spatial = x.shape
    n = [s // q for s, q in zip(spatial, p)]
    d = len(spatial)
    x = x.movedim(1, -1).reshape(b, *[v for pair in zip(n, p) for v in pair], c)  # B, n0, p0, n1, p1, ..., C
    x = x.permute(0, *[2 + 2 * i for i in range(d)], *[1 + 2 * i for i in range(d)], 1 + 2 * d)  # B, p..., n..., C
    return x.reshape(b * math.prod(p), math.prod(n), c)


def from_sparse_tokens(tokens: torch.Tensor, spatial_size: Sequence[int], p: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_sparse_tokens`: ``(B * prod(p), prod(S / p), C) -> (B, C, *S)``."""
    d = len(spatial_size)
    c = tokens.shape[-1]
    n = [s // q for s, q in zip(spatial_size, p)]
    x = tokens.reshape(-1, *p, *n, c)  # B, p..., n..., C
    x = x.permute(0, 1 + 2 * d, *[v for i in range(d) for v in (1 + d + i, 1 + i)])  # B, C, n0, p0, n1, p1, ...
    return x.reshape(x.shape[0], c, *spatial_size)


class MultiHeadSelfAttention(nn.Module):
    """``softmax(q k^T / sqrt(head_dim)) v`` per head, with an inner width of ``heads * head_dim`` that differs
    from the token width (official: 4 heads x 8 = 32 for tokens of 96 or 48 channels). ``(N, L, dim) -> (N, L,
    dim)``; qkv projection without bias, output projection with bias."""

    def __init__(self, dim: int, heads: int = 4, head_dim: int = 8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, dim) -> (3, N, heads, L, head_dim)``, a view."""
        n, length, _ = x.shape
        return self.to_qkv(x).view(n, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def project(self, heads_out: torch.Tensor) -> torch.Tensor:
        """``(N, heads, L, head_dim) -> (N, L, dim)``."""
        n, _, length, _ = heads_out.shape
        return self.to_out(heads_out.transpose(1, 2).reshape(n, length, self.heads * self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unbind(0)
        return self.project(F.scaled_dot_product_attention(q, k, v))


class SparseTransformerLayer(nn.Module):
    """One pre-norm Transformer layer: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))`` with a SiLU MLP."""

    def __init__(self, dim: int, mlp_dim: int, heads: int = 4, head_dim: int = 8):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = MultiHeadSelfAttention(dim, heads, head_dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.SiLU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class SparseTransformer(nn.Module):
    """Feature map in, feature map out through sparse tokens: ``(B, C, *S) -> (B, C, *S)``."""

    def __init__(self, dim: int, mlp_dim: int, depth: int = 1, heads: int = 4, head_dim: int = 8,
                 patch_size: int = 2):
        super().__init__()
        self.patch_size = patch_size
        self.layers = nn.Sequential(*[SparseTransformerLayer(dim, mlp_dim, heads, head_dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        p = sparse_patch_size(spatial, (self.patch_size,) * len(spatial))
        return from_sparse_tokens(self.layers(to_sparse_tokens(x, p)), spatial, p)
