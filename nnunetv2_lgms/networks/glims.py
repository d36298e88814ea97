"""GLIMS (Yazıcı et al., "GLIMS: Attention-Guided Lightweight Multi-Scale Hybrid Network for Volumetric Semantic
Segmentation", arXiv 2404.17854), one implementation for 2D and 3D, built from an nnU-Net plan.

Topology (official ``GLIMS.py``; f = ``feature_size`` = 24; level l has width ``f * 2**l``, level 5 ``32 f``):

=========  ====================================================  ==============================================
level      encoder                                               decoder
=========  ====================================================  ==============================================
0 (1)      stem 1x1 conv-IN-PReLU; DMSF_1 (2 DACB, down) -> CSAB  DMSU_1 -> head 1
1 (1/2)    DMSF_2 -> CSAB                                         DMSU_2 -> head 2
2 (1/4)    DMSF_3 -> CSAB                                         DMSU_3 -> head 3
3 (1/8)    Swin t3 (depth 2); DMSF_4 -> CSAB                      DMSU_4 -> head 4; Swin t3_up (depth 2)
4 (1/16)   Swin t4_pre (depth 6) -> LN -> CSAB (skip 5);          t4_post: PatchExpand, concat skip 5, 1x1,
           PatchMerging -> LN                                    Swin (depth 6) -> aux head 5 (nnU-Net only)
5 (1/32)   Swin t4 (depth 2, bottleneck)
=========  ====================================================  ==============================================

Every Swin stage adds a learnable absolute position embedding ``(1, C, prod(S))`` first; t3, t3_up and t4 end with a
non-affine LayerNorm. Heads are 1x1 convs with bias. Outputs are raw logits.

nnU-Net plumbing (not in the paper):

* **Per-axis strides.** The five downsamplings (4 strided convs + the patch merging) use the plan's ``strides[1:6]``
  (``strides[0]`` is nnU-Net's stride-1 stem entry); transposed convs and PatchExpand mirror them. Plans with fewer
  than five pools get **stride 1 on the missing deepest levels** (so e.g. a 3-pool Hippocampus plan runs levels 3-5
  at the same resolution, a merging with stride 1 being LN + Linear C -> 2C); pools beyond the fifth are ignored.
* **Position embeddings** are sized per axis from the patch size and strides at construction (official: hard-coded
  for 96^3). The input must have exactly ``patch_size`` (nnU-Net's sliding window guarantees this).
* **Kernels**: the depthwise 3-tap convs and the CSAB 7-tap conv get kernel 1 on axes where the plan's
  ``kernel_sizes`` entry for that level is 1 (anisotropic plans, e.g. (1, 3, 3)). The Swin window stays 7 per axis
  (it shrinks to small maps on its own).
* **Deep supervision**: with ``decoder.deep_supervision`` the forward returns five logits, full resolution first:
  the official four heads (levels 0-3) plus an auxiliary head on t4_post (level 4) that nnU-Net weights 0, so the
  effective weights are GLIMS's own 1, 1/2, 1/4, 1/8 (normalised). Without it, one tensor (head 1).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, convert_dim_to_conv_op

from nnunetv2_lgms.networks.common import count_parameters
from nnunetv2_lgms.networks.glims_blocks import CSAB, DMSF, DMSU, conv_in_prelu
from nnunetv2_lgms.networks.swin import PatchExpand, PatchMerging, SwinLayer

NUM_LEVELS = 6  # 5 downsamplings: four strided convs and one patch merging
PAPER_PATCH_SIZE = 96


def glims_strides(plan_strides: Sequence[Sequence[int]], dim: int) -> List[Tuple[int, ...]]:
    """The 6 per-level strides GLIMS uses for an nnU-Net plan: the plan's first six entries (the first is the
    stride-1 stem), padded with stride 1 on the deepest levels when the plan has fewer stages."""
    strides = [tuple(int(v) for v in s) for s in plan_strides[:NUM_LEVELS]]
    if strides and any(v != 1 for v in strides[0]):
        raise ValueError(f"GLIMS expects the plan's first stride to be 1 on every axis (nnU-Net's default "
                         f"planners write that), got {strides[0]}")
    if any(len(s) != dim for s in strides):
        raise ValueError(f"strides {strides} do not match dimension {dim}")
    return strides + [(1,) * dim] * (NUM_LEVELS - len(strides))


def glims_deep_supervision_scales(plan_strides: Sequence[Sequence[int]], dim: int) -> List[List[float]]:
    """Scales of the five deep-supervision outputs for nnU-Net's loss, full resolution first (levels 0-4)."""
    strides = np.array(glims_strides(plan_strides, dim), dtype=float)
    return [list(s) for s in (1 / np.cumprod(strides, axis=0))[:-1]]


def _channel_axis_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1)


def _channel_axis_first(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(-1, 1).contiguous()


def _plain_layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Non-affine LayerNorm over the channels of a channel-last tensor (official ``F.layer_norm`` on outputs)."""
    return F.layer_norm(x, x.shape[-1:])


class PositionEmbedding(nn.Module):
    """Learnable absolute position embedding ``(1, C, prod(S))`` added to a ``(B, C, *S)`` map (official: ``S`` =
    12^3, 6^3 or 3^3, for 96^3 inputs only; here ``S`` comes from the plan)."""

    def __init__(self, channels: int, feature_size: Sequence[int]):
        super().__init__()
        self.feature_size = tuple(int(s) for s in feature_size)
        self.weight = nn.Parameter(torch.zeros(1, channels, int(np.prod(self.feature_size))))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.feature_size:
            raise ValueError(f"GLIMS position embeddings were built for a {self.feature_size} feature map, got "
                             f"{tuple(x.shape[2:])}: the input must have the patch size the network was built for")
        return x + self.weight.view(1, -1, *self.feature_size)


class SwinStage(nn.Module):
    """Position embedding + Swin layer on a ``(B, C, *S)`` map (official ``BasicLayer`` with ``pos_embed``).

    ``output_norm``: non-affine LayerNorm on the output (t3, t4, t3_up). With ``merge_factors`` (t4_pre) the raw Swin
    output is also patch-merged and the forward returns ``(LN(out) (B, C, *S), LN(merged) (B, 2C, *S / factors))``.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window: Sequence[int], feature_size: Sequence[int],
                 output_norm: bool = True, merge_factors: Optional[Sequence[int]] = None,
                 legacy_merging: bool = True, exact_relative_bias: bool = False):
        super().__init__()
        self.pos_embed = PositionEmbedding(dim, feature_size)
        self.layer = SwinLayer(dim, depth, num_heads, window, exact_relative_bias=exact_relative_bias)
        self.output_norm = output_norm
        self.downsample = PatchMerging(dim, merge_factors, legacy_merging) if merge_factors is not None else None

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        x = self.layer(_channel_axis_last(self.pos_embed(x)))
        if self.downsample is not None:
            merged = self.downsample(x)
            return _channel_axis_first(_plain_layer_norm(x)), _channel_axis_first(_plain_layer_norm(merged))
        return _channel_axis_first(_plain_layer_norm(x) if self.output_norm else x)


class SwinUpStage(nn.Module):
    """t4_post: PatchExpand 2C -> C by ``expand_factors``, + position embedding, concat the skip (2C), 1x1
    conv-IN-PReLU -> C, Swin layer; no output norm. ``(B, 2C, *S / f), skip (B, C, *S) -> (B, C, *S)``."""

    def __init__(self, conv_op: Type[_ConvNd], dim: int, depth: int, num_heads: int, window: Sequence[int],
                 feature_size: Sequence[int], expand_factors: Sequence[int], exact_relative_bias: bool = False):
        super().__init__()
        self.expand = PatchExpand(2 * dim, expand_factors)
        self.pos_embed = PositionEmbedding(dim, feature_size)
        self.fuse = conv_in_prelu(conv_op, 2 * dim, dim)
        self.layer = SwinLayer(dim, depth, num_heads, window, exact_relative_bias=exact_relative_bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.pos_embed(_channel_axis_first(self.expand(_channel_axis_last(x))))
        x = self.fuse(torch.cat([x, skip], dim=1))
        return _channel_axis_first(self.layer(_channel_axis_last(x)))


class GLIMSEncoder(nn.Module):
    """Stem, DMSF_1-4, Swin t3 and t4_pre (with the patch merging), the CSABs on the five skips and the Swin
    bottleneck t4. ``(B, C_in, *S) -> ([skip_0 .. skip_4], bottleneck)``; skip_l has width ``f 2^l`` at level l,
    the bottleneck ``32 f`` at level 5."""

    def __init__(self, conv_op, input_channels, f, strides, kernel_sizes, sizes, depths, num_heads, window,
                 fix_spatial_gate, legacy_merging, exact_relative_bias):
        super().__init__()
        swin = dict(window=window, exact_relative_bias=exact_relative_bias)
        self.stem = conv_in_prelu(conv_op, input_channels, f, 1)
        self.dmsf = nn.ModuleList(
            DMSF(conv_op, f * 2 ** level, strides[level + 1], kernel_sizes[level]) for level in range(4))
        self.t3 = SwinStage(8 * f, depths[1], num_heads[1], feature_size=sizes[3], **swin)
        self.t4_pre = SwinStage(16 * f, depths[2], num_heads[2], feature_size=sizes[4], merge_factors=strides[5],
                                legacy_merging=legacy_merging, **swin)
        self.t4 = SwinStage(32 * f, depths[3], num_heads[3], feature_size=sizes[5], **swin)
        self.csab = nn.ModuleList(
            CSAB(conv_op, f * 2 ** level, plan_kernel=kernel_sizes[level], fix_spatial_gate=fix_spatial_gate)
            for level in range(5))

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        x = self.stem(x)
        skips = []
        for level, stage in enumerate(self.dmsf):
            if level == 3:
                x = self.t3(x)
            skip, x = stage(x)
            skips.append(skip)
        skip, x = self.t4_pre(x)
        skips.append(skip)
        skips = [csab(s) for csab, s in zip(self.csab, skips)]
        return skips, self.t4(x)


class GLIMSDecoder(nn.Module):
    """t4_post, DMSU_4-1, Swin t3_up and the heads. ``([skip_0 .. skip_4], bottleneck) -> logits`` (tensor, head 1),
    or with ``deep_supervision`` a list of five logits at levels 0-4, full resolution first (heads 1-4 of the
    official code and an auxiliary head on t4_post)."""

    def __init__(self, conv_op, f, num_classes, strides, kernel_sizes, sizes, depths, num_heads, window,
                 deep_supervision, exact_relative_bias):
        super().__init__()
        self.deep_supervision = deep_supervision
        swin = dict(window=window, exact_relative_bias=exact_relative_bias)
        self.t4_post = SwinUpStage(conv_op, 16 * f, depths[2], num_heads[2], feature_size=sizes[4],
                                   expand_factors=strides[5], **swin)
        self.dmsu = nn.ModuleList(
            DMSU(conv_op, f * 2 ** level, strides[level + 1], kernel_sizes[level]) for level in range(4))
        self.t3_up = SwinStage(8 * f, depths[1], num_heads[1], feature_size=sizes[3], **swin)
        self.seg_layers = nn.ModuleList(conv_op(f * 2 ** level, num_classes, 1, bias=True) for level in range(5))

    def forward(self, skips: List[torch.Tensor], x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        x = self.t4_post(x, skips[4])
        features = [x]
        for level in (3, 2, 1, 0):
            x = self.dmsu[level](x, skips[level])
            features.append(x)
            if level == 3:
                x = self.t3_up(x)
        if not self.deep_supervision:
            return self.head(0, features[-1])
        return [self.head(level, features[4 - level]) for level in range(5)]

    def head(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """The 1x1 segmentation head of ``level``."""
        return self.seg_layers[level](x)


class GLIMS(nn.Module):
    """GLIMS for 2D (``conv_op=nn.Conv2d``) or 3D (``nn.Conv3d``).

    Args:
        input_channels: image channels (any).
        num_classes: output channels (labels incl. background, or regions); raw logits.
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        patch_size: input size the position embeddings are built for. Default: 96 per axis (the paper's 96^3).
        strides: six per-axis strides, the first all ones (see :func:`glims_strides`). Default: 2 on all axes.
        kernel_sizes: per-level plan kernels (levels 0-4 used); only whether an axis is 1 matters. Default: 3.
        feature_size: ``f``, width of level 0; a multiple of 12 (official constraint, keeps head dims integral).
        depths, num_heads: official ``(2, 2, 6, 2)`` / ``(3, 6, 12, 24)``; entries 1-3 are used (t3/t3_up,
            t4_pre/t4_post, t4), entry 0 is unused as in the official code.
        window_size: Swin window per axis (7).
        deep_supervision: return a list of five logits (levels 0-4, full resolution first) instead of one tensor.
            nnU-Net toggles ``self.decoder.deep_supervision``.
        fix_spatial_gate: drop the LayerNorm that makes the CSAB spatial gate constant (see :class:`CSAB`).
            Default False = official behaviour.
        legacy_merging: use MONAI's legacy duplicate-slice patch merging when the merge is 2x on every axis
            (official). False: every sub-grid once (``PatchMergingV2``-style).
        exact_relative_bias: correct relative-position index for shrunk windows instead of the official ``[:n, :n]``
            slicing (see :mod:`nnunetv2_lgms.networks.swin`).

    Shapes: ``(B, input_channels, *patch_size) -> (B, num_classes, *patch_size)``; at level l the map is
    ``patch_size / prod(strides[:l+1])``.
    """

    def __init__(self, input_channels: int, num_classes: int, conv_op: Type[_ConvNd] = nn.Conv3d,
                 patch_size: Optional[Sequence[int]] = None,
                 strides: Optional[Sequence[Sequence[int]]] = None,
                 kernel_sizes: Optional[Sequence[Sequence[int]]] = None,
                 feature_size: int = 24, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 deep_supervision: bool = False, fix_spatial_gate: bool = False, legacy_merging: bool = True,
                 exact_relative_bias: bool = False):
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)
        if feature_size % 12:
            raise ValueError(f"feature_size must be divisible by 12 (official constraint), got {feature_size}")
        patch_size = tuple(int(p) for p in (patch_size or (PAPER_PATCH_SIZE,) * dim))
        strides = glims_strides(strides, dim) if strides is not None else [(1,) * dim] + [(2,) * dim] * 5
        kernel_sizes = [tuple(k) for k in (kernel_sizes or [(3,) * dim] * NUM_LEVELS)][:NUM_LEVELS]
        kernel_sizes += [kernel_sizes[-1]] * (NUM_LEVELS - len(kernel_sizes))
        total = np.prod(np.array(strides), axis=0)
        if len(patch_size) != dim or any(p % t for p, t in zip(patch_size, total)):
            raise ValueError(f"patch size {patch_size} must be divisible per axis by the product of the strides "
                             f"{tuple(int(t) for t in total)}")
        sizes = [tuple(int(v) for v in np.array(patch_size) // c) for c in np.cumprod(np.array(strides), axis=0)]
        window = (window_size,) * dim
        self.patch_size, self.strides, self.feature_sizes = patch_size, strides, sizes
        self.encoder = GLIMSEncoder(conv_op, input_channels, feature_size, strides, kernel_sizes, sizes, depths,
                                    num_heads, window, fix_spatial_gate, legacy_merging, exact_relative_bias)
        self.decoder = GLIMSDecoder(conv_op, feature_size, num_classes, strides, kernel_sizes, sizes, depths,
                                    num_heads, window, deep_supervision, exact_relative_bias)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        return self.decoder(*self.encoder(x))

    def deep_supervision_heads(self) -> nn.ModuleList:
        """The heads only the deep-supervision outputs use (levels 1-4)."""
        return self.decoder.seg_layers[1:]

    def num_parameters(self, include_auxiliary_heads: bool = False) -> int:
        """Parameters of the published architecture (incl. its four heads); the nnU-Net-only auxiliary head on
        t4_post only with the flag."""
        n = count_parameters(self)
        if not include_auxiliary_heads:
            n -= count_parameters(self.decoder.seg_layers[4])
        return n

    @classmethod
    def from_plan(cls, patch_size: Sequence[int], plan_strides: Sequence[Sequence[int]],
                  plan_kernel_sizes: Sequence[Sequence[int]], input_channels: int, num_classes: int,
                  deep_supervision: bool = True, **kwargs) -> "GLIMS":
        """Build from an nnU-Net configuration (patch size, ``strides``, ``kernel_sizes`` of ``arch_kwargs``)."""
        dim = len(patch_size)
        return cls(input_channels, num_classes, convert_dim_to_conv_op(dim), patch_size,
                   glims_strides(plan_strides, dim), list(plan_kernel_sizes)[:NUM_LEVELS],
                   deep_supervision=deep_supervision, **kwargs)
