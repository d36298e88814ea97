"""Swin Transformer pieces of GLIMS (official ``GLIMS.py``, whose window attention, Swin block, patch merging and
basic layer are edited copies of MONAI's SwinUNETR code), written for 2D and 3D.

All modules here work on **channel-last** tensors ``(B, *S, C)`` with ``len(S)`` = 2 or 3, as the original does.

Fidelity notes (see ``docs/deviations.md``):

* Window attention runs through ``F.scaled_dot_product_attention``; the relative position bias (plus, in shifted
  blocks, the -100 shift mask) is passed as the additive float ``attn_mask``. :func:`window_attention_reference`
  is the explicit ``softmax(q k^T * scale + bias + mask) v`` it is tested against.
* The relative-position index is built for the nominal window (7 per axis). When the window shrinks to a small
  feature map, the official code slices that index ``[:n, :n]`` (n = tokens of the shrunk window), which assigns
  bias entries of a 7-wide window to a narrower one (wrong relative offsets, no crash). This is kept by default
  (``exact_relative_bias=False``); ``exact_relative_bias=True`` instead uses the correct index of the shrunk window
  (same table, same parameter count).
* Padded tokens (feature size not a multiple of the window) are zeros inserted *after* the first LayerNorm and take
  part in the attention of unshifted windows, exactly as in the original.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

SHIFT_MASK_VALUE = -100.0  # the value MONAI/Swin use for tokens of different shifted regions


def get_window_size(feature_size: Sequence[int], window: Sequence[int],
                    shift: Optional[Sequence[int]] = None) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Per-axis effective window and shift: on axes whose feature size is <= the window, the window shrinks to the
    feature size and the shift becomes 0 (MONAI ``get_window_size``)."""
    use_window, use_shift = list(window), list(shift) if shift is not None else [0] * len(window)
    for i, s in enumerate(feature_size):
        if s <= window[i]:
            use_window[i] = s
            use_shift[i] = 0
    return tuple(use_window), tuple(use_shift)


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``(B, *P, C) -> (B * n_windows, prod(window), C)``, P a multiple of the window; windows in raster order."""
    b, *spatial, c = x.shape
    d = len(spatial)
    x = x.view(b, *[v for s, w in zip(spatial, window) for v in (s // w, w)], c)
    x = x.permute(0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1)
    return x.reshape(-1, math.prod(window), c)


def window_reverse(windows: torch.Tensor, window: Sequence[int], batch: int, spatial: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * n_windows, prod(window), C) -> (B, *P, C)``."""
    d = len(spatial)
    c = windows.shape[-1]
    x = windows.view(batch, *[s // w for s, w in zip(spatial, window)], *window, c)
    x = x.permute(0, *[v for i in range(d) for v in (1 + i, 1 + d + i)], 2 * d + 1)
    return x.reshape(batch, *spatial, c)


def relative_position_index(window: Sequence[int], table_window: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``(n, n)`` index of the relative offset between the ``n = prod(window)`` tokens of a window into the
    ``prod(2 t - 1)``-row bias table of a ``table_window`` (default: ``window``; must be >= it per axis)."""
    table_window = tuple(table_window or window)
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)  # D, n
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # n, n, D
    index = torch.zeros(rel.shape[:2], dtype=torch.long)
    for i, t in enumerate(table_window):
        index += (rel[..., i] + t - 1) * math.prod(2 * v - 1 for v in table_window[i + 1:])
    return index


def compute_shift_mask(padded_size: Sequence[int], window: Sequence[int], shift: Sequence[int],
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """``(n_windows, n, n)`` additive mask (0 / -100) that keeps tokens of different cyclically shifted regions
    apart (MONAI ``compute_mask``). Axes with shift 0 form a single region."""
    labels = torch.zeros(padded_size, dtype=torch.long, device=device)
    for axis, (p, w, s) in enumerate(zip(padded_size, window, shift)):
        if s <= 0:
            continue
        region = torch.zeros(p, dtype=torch.long, device=device)
        region[p - w:p - s] = 1
        region[p - s:] = 2
        view = [1] * len(padded_size)
        view[axis] = p
        labels = labels + region.view(view) * 3 ** axis
    windows = window_partition(labels[None, ..., None], window).squeeze(-1)  # n_windows, n
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, SHIFT_MASK_VALUE)


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Explicit ``softmax(q k^T / sqrt(d) + bias (+ mask)) v`` as the official code computes it.
    ``q, k, v: (B_, heads, n, d)``, ``bias: (heads, n, n)``, ``mask: (n_windows, n, n)`` with B_ = B * n_windows."""
    b_, heads, n, d = q.shape
    attn = (q * d ** -0.5) @ k.transpose(-2, -1) + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.view(b_ // nw, nw, heads, n, n) + mask.to(attn.dtype)[None, :, None]
        attn = attn.view(b_, heads, n, n)
    return attn.softmax(dim=-1) @ v


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same as :func:`window_attention_reference` through ``F.scaled_dot_product_attention`` (default scale
    ``d ** -0.5``), the bias and mask forming the additive float ``attn_mask`` (cast to the query dtype for AMP)."""
    b_, heads, n, _ = q.shape
    if mask is None:
        attn_mask = bias.unsqueeze(0).expand(b_, heads, n, n)
    else:
        nw = mask.shape[0]
        attn_mask = (bias.unsqueeze(0) + mask.to(bias.dtype).unsqueeze(1)).repeat(b_ // nw, 1, 1, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window with a learnable relative position bias.
    ``(B_, n, C) -> (B_, n, C)``; qkv and output projection with bias; head dim ``C / heads``."""

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], exact_relative_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by {num_heads} heads")
        self.dim, self.num_heads, self.window = dim, num_heads, tuple(window)
        self.exact_relative_bias = exact_relative_bias
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(math.prod(2 * w - 1 for w in self.window), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _index(self, window: Sequence[int]) -> torch.Tensor:
        n = math.prod(window)
        if tuple(window) == self.window:
            return self.relative_position_index
        if not self.exact_relative_bias:
            return self.relative_position_index[:n, :n]  # the official (MONAI) slicing quirk, see module docstring
        # correct offsets for the shrunk window, in the nominal table's coordinates
        return relative_position_index(window, self.window).to(self.relative_position_index.device)

    def relative_bias(self, window: Sequence[int]) -> torch.Tensor:
        n = math.prod(window)
        bias = self.relative_position_bias_table[self._index(window).reshape(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)  # heads, n, n

    def forward(self, x: torch.Tensor, window: Sequence[int], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b_, n, c = x.shape
        q, k, v = self.qkv(x).view(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = window_attention(q, k, v, self.relative_bias(window), mask)
        return self.proj(out.transpose(1, 2).reshape(b_, n, c))


class SwinMLP(nn.Sequential):
    """MONAI ``MLPBlock`` as GLIMS configures it: Linear(C -> 4C), PReLU (1 parameter), Linear(4C -> C)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        hidden = int(dim * mlp_ratio)
        super().__init__(nn.Linear(dim, hidden), nn.PReLU(), nn.Linear(hidden, dim))


class SwinBlock(nn.Module):
    """Pre-norm Swin block: ``x + WMSA(LN(x))`` (shifted windows when ``shift`` > 0), then ``x + MLP(LN(x))``.
    ``(B, *S, C) -> (B, *S, C)``; the map is zero-padded to a multiple of the effective window after the LayerNorm."""

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], shift: Sequence[int],
                 mlp_ratio: float = 4.0, exact_relative_bias: bool = False):
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, exact_relative_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMLP(dim, mlp_ratio)

    def _attention_part(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, *spatial, c = x.shape
        window, shift = get_window_size(spatial, self.window, self.shift)
        x = self.norm1(x)
        pad = [(-s) % w for s, w in zip(spatial, window)]
        if any(pad):
            x = F.pad(x, [0, 0] + [v for p in reversed(pad) for v in (0, p)])
        padded = x.shape[1:-1]
        dims = tuple(range(1, len(spatial) + 1))
        shifted = any(s > 0 for s in shift)
        if shifted:
            x = torch.roll(x, shifts=[-s for s in shift], dims=dims)
        windows = self.attn(window_partition(x, window), window, mask if shifted else None)
        x = window_reverse(windows, window, b, padded)
        if shifted:
            x = torch.roll(x, shifts=list(shift), dims=dims)
        if any(pad):
            x = x[(slice(None),) + tuple(slice(0, s) for s in spatial)].contiguous()
        return x

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self._attention_part(x, mask)
        return x + self.mlp(self.norm2(x))


class SwinLayer(nn.Module):
    """``depth`` Swin blocks alternating regular and shifted windows (shift = window // 2), MONAI ``BasicLayer``
    without its downsampling. ``(B, *S, C) -> (B, *S, C)``."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: Sequence[int], mlp_ratio: float = 4.0,
                 exact_relative_bias: bool = False):
        super().__init__()
        self.window = tuple(window)
        self.shift = tuple(w // 2 for w in self.window)
        no_shift = (0,) * len(self.window)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, self.window, no_shift if i % 2 == 0 else self.shift, mlp_ratio,
                      exact_relative_bias) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[1:-1]
        window, shift = get_window_size(spatial, self.window, self.shift)
        mask = None
        if len(self.blocks) > 1 and any(s > 0 for s in shift):
            padded = [math.ceil(s / w) * w for s, w in zip(spatial, window)]
            mask = compute_shift_mask(padded, window, shift, x.device)
        for block in self.blocks:
            x = block(x, mask)
        return x


def _legacy_merge_offsets(dim: int) -> Tuple[Tuple[int, ...], ...]:
    """Sub-grid offsets (and their order) of MONAI's legacy ``PatchMerging`` for a 2x merge on every axis. In 3D two
    entries repeat (offsets (1,1,0) and (0,1,1) are never used), as in the code that produced the published models."""
    if dim == 2:
        return (0, 0), (1, 0), (0, 1), (1, 1)
    return (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)


class PatchMerging(nn.Module):
    """Concatenate the ``prod(factors)`` sub-grids of stride ``factors`` (channel-last), LayerNorm, Linear to 2C
    without bias. ``(B, *S, C) -> (B, *S / factors, 2C)``.

    With a factor of 2 on every axis the official (legacy, duplicate-slice in 3D) offsets are used unless
    ``legacy=False``; otherwise (anisotropic per-axis factors from nnU-Net plans, e.g. (1, 2, 2)) every offset is
    used once, as MONAI's ``PatchMergingV2`` does. A factor of 1 on every axis is a plain LN + Linear C -> 2C.
    """

    def __init__(self, dim: int, factors: Sequence[int], legacy: bool = True):
        super().__init__()
        self.factors = tuple(int(f) for f in factors)
        if legacy and all(f == 2 for f in self.factors):
            self.offsets = _legacy_merge_offsets(len(self.factors))
        else:
            self.offsets = tuple(itertools.product(*[range(f) for f in self.factors]))
        self.norm = nn.LayerNorm(len(self.offsets) * dim)
        self.reduction = nn.Linear(len(self.offsets) * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[1:-1]
        pad = [(-s) % f for s, f in zip(spatial, self.factors)]
        if any(pad):
            x = F.pad(x, [0, 0] + [v for p in reversed(pad) for v in (0, p)])
        parts = [x[(slice(None),) + tuple(slice(o, None, f) for o, f in zip(off, self.factors))]
                 for off in self.offsets]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


class PatchExpand(nn.Module):
    """Linear C -> prod(factors) * C/2 without bias, pixel-shuffle the channels into the upsampled axes
    (channel order ``(f_0, f_1, [f_2,] c)``), then LayerNorm(C/2). ``(B, *S, C) -> (B, *S * factors, C/2)``.
    Official 3D: Linear(768 -> 3072) and a 2x2x2 shuffle; 2D: Linear(C -> 2C)."""

    def __init__(self, dim: int, factors: Sequence[int]):
        super().__init__()
        if dim % 2:
            raise ValueError(f"PatchExpand needs an even width, got {dim}")
        self.factors = tuple(int(f) for f in factors)
        self.out_dim = dim // 2
        self.expand = nn.Linear(dim, math.prod(self.factors) * self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *spatial, _ = x.shape
        d = len(spatial)
        x = self.expand(x).view(b, *spatial, *self.factors, self.out_dim)
        x = x.permute(0, *[v for i in range(d) for v in (1 + i, 1 + d + i)], 2 * d + 1)
        x = x.reshape(b, *[s * f for s, f in zip(spatial, self.factors)], self.out_dim)
        return self.norm(x)
