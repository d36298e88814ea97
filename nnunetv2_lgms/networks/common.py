"""Building blocks shared by LGMSNet and GLIMS.

Every block takes a ``conv_op`` (``nn.Conv2d`` or ``nn.Conv3d``), as ``dynamic_network_architectures`` does, and
derives the matching norm ops from it, so one class serves 2D and 3D.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim

IntOrSeq = Union[int, Sequence[int]]


def as_tuple(value: IntOrSeq, dim: int) -> Tuple[int, ...]:
    """``3 -> (3, 3)`` for dim 2; sequences are checked for length and returned as tuples."""
    if isinstance(value, int):
        return (value,) * dim
    value = tuple(int(v) for v in value)
    if len(value) != dim:
        raise ValueError(f"expected {dim} values, got {value}")
    return value


def same_padding(kernel_size: Sequence[int], dilation: IntOrSeq = 1) -> Tuple[int, ...]:
    dilation = as_tuple(dilation, len(kernel_size))
    return tuple((k - 1) // 2 * d for k, d in zip(kernel_size, dilation))


def restrict_kernel(kernel: int, plan_kernel: Sequence[int]) -> Tuple[int, ...]:
    """Cubic ``kernel`` per axis, except axes on which the nnU-Net plan uses a kernel of 1 (anisotropic data,
    e.g. plan kernel (1, 3, 3) turns a 9-tap depthwise kernel into (1, 9, 9))."""
    return tuple(kernel if k > 1 else 1 for k in plan_kernel)


def batch_norm_for(conv_op: Type[_ConvNd]) -> Type[nn.Module]:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[convert_conv_op_to_dim(conv_op)]


def instance_norm_for(conv_op: Type[_ConvNd]) -> Type[nn.Module]:
    return {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[convert_conv_op_to_dim(conv_op)]


class ConvNormAct(nn.Sequential):
    """``conv -> norm -> act`` (or ``conv -> act -> norm`` with ``act_first=True``), padding 'same', stride 1.
    ``(B, C_in, *S) -> (B, C_out, *S)``. ReLU-type activations run in place (nothing needs their input)."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, kernel_size: IntOrSeq,
                 norm_op: Optional[Type[nn.Module]], act: Optional[Type[nn.Module]], bias: bool = False,
                 groups: int = 1, norm_kwargs: Optional[dict] = None, act_first: bool = False):
        kernel_size = as_tuple(kernel_size, convert_conv_op_to_dim(conv_op))
        layers = [conv_op(in_channels, out_channels, kernel_size, padding=same_padding(kernel_size),
                          groups=groups, bias=bias)]
        post = []
        if norm_op is not None:
            post.append(norm_op(out_channels, **(norm_kwargs or {})))
        if act is not None:
            in_place = issubclass(act, (nn.ReLU, nn.LeakyReLU))
            post.insert(0 if act_first else len(post), act(inplace=True) if in_place else act())
        super().__init__(*layers, *post)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def inference_parameters(net: nn.Module) -> int:
    """Parameters of the inference path: this package's networks exclude their training-only deep-supervision heads
    (``num_parameters()``, as ``paper-check`` reports them); any other network counts all its parameters."""
    fn = getattr(net, "num_parameters", None)
    return int(fn()) if callable(fn) else count_parameters(net)


def spatial_size_after(size: Sequence[int], strides: Sequence[Sequence[int]]) -> Tuple[int, ...]:
    """Feature-map size after applying each per-axis stride in turn (floor division, as max-pooling does)."""
    size = tuple(size)
    for s in strides:
        size = tuple(a // b for a, b in zip(size, s))
    return size


def interpolate_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(Bi/tri)linear resize to ``size``, ``align_corners=False``; equals ``scale_factor=2`` when size doubles."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]
    return nn.functional.interpolate(x, size=tuple(size), mode=mode, align_corners=False)
