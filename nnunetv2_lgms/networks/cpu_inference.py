"""Fast paths for inference on CPU: the same math as the modules' plain forward, computed with fewer passes over
memory and fewer fresh full-size feature maps.

Why: at nnU-Net's patch sizes the high-resolution maps of the light networks are wide (batch x 256 x 256 pixels) and
cheap per element, so on CPU an elementwise pass, or a freshly allocated map (page faults), costs about as much as
the conv that produced it. The fused and blockwise paths apply only without autograd, in eager mode (under
``torch.compile`` Inductor fuses on its own), to float32 tensors on CPU; elsewhere the callers fall back to the plain
computation. :func:`can_overwrite_intermediates` (in-place work on a block's own fresh tensors) holds on any device.
Equivalence to the plain path is tested in ``tests/test_speed_paths.py``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

# pixels per block in :func:`pointwise_convs_blockwise`: a 64-channel float32 block is 2 MB and stays in L2
BLOCK_PIXELS = 8192


def is_compiling() -> bool:
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn and fn())


def can_overwrite_intermediates(x: torch.Tensor) -> bool:
    """Whether a block may compute in place on tensors it created itself: no autograd graph is being recorded
    (in-place ops would corrupt it) and nothing is traced."""
    return not torch.is_grad_enabled() and not is_compiling() and x.device.type != "meta"


def _cpu_float32_inference(*tensors: Optional[torch.Tensor]) -> bool:
    return (not torch.is_grad_enabled() and not is_compiling()
            and all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors))


def pixels_dense(x: torch.Tensor) -> bool:
    """Whether ``x`` (B, C, *S) is dense with its channels last, i.e. a (pixels, C) matrix for GEMMs."""
    return x.movedim(1, -1).is_contiguous()


def _onednn_conv_pointwise():
    """``torch.ops.mkldnn._convolution_pointwise`` (the fused conv + post-op that Inductor's CPU backend emits), or
    None when this PyTorch build lacks it or oneDNN is switched off."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def _onednn_activation(act: nn.Module) -> Optional[Tuple[str, list, Optional[str]]]:
    """oneDNN's name, scalars and algorithm for an activation module, or None if it has no eltwise post-op here."""
    kind = type(act)
    if kind is nn.ReLU:
        return "relu", [], None
    if kind is nn.SiLU:
        return "swish", [], None
    if kind is nn.GELU:
        return "gelu", [], act.approximate  # "none" (erf) or "tanh"
    if kind is nn.LeakyReLU:
        return "leaky_relu", [act.negative_slope], None
    return None


def conv_act_fused(conv: _ConvNd, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   act: nn.Module, groups: Optional[int] = None) -> Optional[torch.Tensor]:
    """``act(conv(x))`` with ``conv``'s geometry and the given ``weight``/``bias`` (and ``groups``, default the
    conv's), as one oneDNN convolution with the activation as a post-op (no separate pass over the output); None
    where that path does not apply."""
    if (not _cpu_float32_inference(x, weight, bias) or x.ndim not in (4, 5) or conv.transposed
            or conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
        return None
    post_op = _onednn_activation(act)
    op = _onednn_conv_pointwise() if post_op is not None else None
    if op is None:
        return None
    attr, scalars, algorithm = post_op
    return op(x, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation),
              conv.groups if groups is None else groups, attr, scalars, algorithm)


IN_PLACE_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.Identity)


def activation_in_place(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)`` written into ``x``, for the modules in ``IN_PLACE_ACTIVATIONS``."""
    kind = type(act)
    if kind is nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if kind is nn.SiLU:
        return F.silu(x, inplace=True)
    if kind is nn.ReLU:
        return x.relu_()
    if kind is nn.LeakyReLU:
        return F.leaky_relu_(x, act.negative_slope)
    if kind is nn.Identity:
        return x
    raise TypeError(f"no in-place form for {kind.__name__}")


def pointwise_convs_blockwise(x: Union[torch.Tensor, Sequence[torch.Tensor]],
                              layers: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor], nn.Module]],
                              out_affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                              block_pixels: int = BLOCK_PIXELS) -> Optional[torch.Tensor]:
    """A stack of 1x1 convs, each followed by its activation, then optionally ``y * scale + shift`` per channel,
    computed on blocks of ``block_pixels`` pixels: ``(B, C_0, *S) -> (B, C_n, *S)`` in channels-last format.

    ``x``: the input map, or several maps that together are its channels (then the first conv is a sum of one GEMM
    per part, and the concatenation is never formed). ``layers``: per conv its weight ``(C_i+1, C_i, 1, ...)``,
    bias and activation module. The wide intermediate maps (e.g. LGMSNet's 4 x C expansion in the decoder fusion)
    then exist only one cache-sized block at a time instead of as full maps. None where the path does not apply:
    not CPU float32 inference, an input not channels-last, a kernel larger than 1 or an activation without an
    in-place form.
    """
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    tensors = [t for weight, bias, _ in layers for t in (weight, bias)] + list(out_affine or ()) + parts
    if not (_cpu_float32_inference(*tensors) and layers and all(p.ndim in (4, 5) for p in parts)):
        return None
    pixels_first = [p.movedim(1, -1) for p in parts]
    if (not all(p.is_contiguous() for p in pixels_first)  # i.e. pixels_dense, on the views needed anyway
            or any(p.shape[:-1] != pixels_first[0].shape[:-1] for p in pixels_first)
            or any(w.shape[2:].numel() != 1 for w, _, _ in layers)
            or any(type(act) not in IN_PLACE_ACTIVATIONS for _, _, act in layers)
            or sum(p.shape[-1] for p in pixels_first) != layers[0][0].shape[1]):
        return None
    pixels = [p.reshape(-1, p.shape[-1]) for p in pixels_first]
    # GEMM operands: weight (C_out, C_in, 1..) -> (C_in, C_out); the first one split by input part
    mats = [(w.reshape(w.shape[0], -1).t(), b, act) for w, b, act in layers]
    first_parts = mats[0][0].split([p.shape[1] for p in pixels])
    n_pixels = pixels[0].shape[0]
    out = torch.empty((*pixels_first[0].shape[:-1], mats[-1][0].shape[1]), dtype=torch.float32)  # channels-last
    out_pixels = out.view(-1, out.shape[-1])
    buffers = [torch.empty(min(block_pixels, n_pixels), m.shape[1], dtype=torch.float32) for m, _, _ in mats[:-1]]
    for start in range(0, n_pixels, block_pixels):
        stop = min(start + block_pixels, n_pixels)
        h = None  # the previous layer's activated block
        for i, (mat, bias, act) in enumerate(mats):
            dest = buffers[i][:stop - start] if i < len(buffers) else out_pixels[start:stop]
            if i == 0:
                _matmul_into(dest, pixels[0][start:stop], first_parts[0], bias)
                for part, mat_part in zip(pixels[1:], first_parts[1:]):
                    dest.addmm_(part[start:stop], mat_part)
            else:
                _matmul_into(dest, h, mat, bias)
            h = activation_in_place(act, dest)
        if out_affine is not None:
            h.mul_(out_affine[0]).add_(out_affine[1])
    return out.movedim(-1, 1)


def _matmul_into(dest: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if bias is None:
        torch.mm(a, b, out=dest)
    else:
        torch.addmm(bias, a, b, out=dest)
