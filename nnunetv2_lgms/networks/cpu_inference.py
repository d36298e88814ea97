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

from nnunetv2_lgms.flops import is_counting_flops

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


def onednn_post_op(act: nn.Module) -> Optional[Tuple[str, list, Optional[str]]]:
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
                   act: Optional[nn.Module], groups: Optional[int] = None) -> Optional[torch.Tensor]:
    """``act(conv(x))`` with ``conv``'s geometry and the given ``weight``/``bias`` (and ``groups``, default the
    conv's), as one oneDNN convolution with the activation as a post-op (no separate pass over the output); None
    where that path does not apply.

    ``act=None``: the conv alone, through oneDNN all the same. PyTorch's own dispatch sends narrow convs at batch 1
    (batch x C_in x D x H below 20480) to its im2col kernel: LGMSNet-3D's 4 -> 16 3x3x3 conv at 40x56x40 took 63 ms
    there and 5.7 ms in oneDNN; nnU-Net's sliding window predicts 3D at batch 1."""
    if (not _cpu_float32_inference(x, weight, bias) or x.ndim not in (4, 5) or conv.transposed
            or conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
        return None
    post_op = ("none", [], None) if act is None else onednn_post_op(act)
    op = _onednn_conv_pointwise() if post_op is not None else None
    if op is None:
        return None
    attr, scalars, algorithm = post_op
    return op(x, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation),
              conv.groups if groups is None else groups, attr, scalars, algorithm)


IN_PLACE_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.Identity)


def has_in_place_form(act: Optional[nn.Module], x: torch.Tensor) -> bool:
    """Whether :func:`activation_in_place` takes ``act`` on ``x``: None (no activation), the
    ``IN_PLACE_ACTIVATIONS``, and on CPU a single-parameter PReLU (a leaky ReLU with a learnt slope, read as a Python
    number: on a GPU that read would wait for the device)."""
    return (act is None or type(act) in IN_PLACE_ACTIVATIONS
            or (isinstance(act, nn.PReLU) and act.weight.numel() == 1 and x.device.type == "cpu"))


def activation_in_place(act: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``act(x)`` written into ``x``, for the activations of :func:`has_in_place_form` (not under autograd for a
    PReLU)."""
    if act is None:
        return x
    kind = type(act)
    if isinstance(act, nn.PReLU) and act.weight.numel() == 1:
        return F.leaky_relu_(x, float(act.weight))
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


def is_per_sample_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` normalises with the statistics of each sample: a GroupNorm, or an InstanceNorm without running
    statistics (nnU-Net's and GLIMS's 3D norms); neither can be folded into a conv."""
    if isinstance(norm, nn.GroupNorm):
        return True
    return isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats


def per_group_mean(per_channel: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C) -> (B, C): each channel gets the mean over its group's channels."""
    b, c = per_channel.shape
    return per_channel.view(b, groups, c // groups).mean(2, keepdim=True).expand(b, groups, c // groups).reshape(b, c)


def group_moments(mean: torch.Tensor, var: torch.Tensor, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel means and variances (B, C) -> those of each channel's group, per channel. Equal counts: the mean
    of the means, and the mean of the variances plus the variance of the means."""
    if groups == mean.shape[1]:
        return mean, var
    group_mean = per_group_mean(mean, groups)
    return group_mean, per_group_mean(var + (mean - group_mean).square(), groups)


def per_sample_norm_act_(x: torch.Tensor, norm: nn.Module, act: Optional[nn.Module] = None,
                         block_pixels: int = BLOCK_PIXELS, channels: Optional[slice] = None) -> Optional[torch.Tensor]:
    """``act(norm(x))`` written into ``x`` (B, C, *S), for a norm of :func:`is_per_sample_norm` and an activation of
    :func:`has_in_place_form`; None (``x`` untouched) where the path does not apply: not CPU float32 inference, or
    ``x`` neither contiguous nor channels-last, or FLOPs being counted (its reductions are GEMVs, which
    ``FlopCounterMode`` would count). The caller must own ``x`` (a fresh intermediate). With ``channels``, ``x`` is
    that slice of the norm's input channels (a norm with per-channel statistics only: InstanceNorm, or GroupNorm with
    one channel per group).

    Why: ``nn.InstanceNorm`` on a channels-last map first copies it to NC(D)HW (GLIMS level 0, 9x24x40x56x40:
    ~210 ms against ~40 ms); on either layout it writes a fresh map, and the activation a second one. Here: the
    per-channel means (one reduction), the squared deviations from them summed block by block with a GEMV (two
    passes, so no cancellation; float64 accumulation across blocks), then one scale-and-shift and the activation in
    place. GroupNorm's group statistics combine its channels' (equal counts): the mean of the means, and the mean of
    the variances plus the variance of the means.
    """
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if channels is not None:
        weight, bias = (None if t is None else t[channels] for t in (weight, bias))
    affine = [t for t in (weight, bias) if t is not None]
    if not (_cpu_float32_inference(x, *affine) and not is_counting_flops() and x.ndim in (3, 4, 5)
            and is_per_sample_norm(norm) and has_in_place_form(act, x) and (x.is_contiguous() or pixels_dense(x))
            and all(t.shape == x.shape[1:2] for t in affine)):
        return None
    b, c = x.shape[:2]
    groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else c
    if channels is not None:
        if isinstance(norm, nn.GroupNorm) and norm.num_groups != norm.num_channels:
            return None  # (its statistics span channels outside the slice)
        groups = c
    rows = x.movedim(1, -1).reshape(b, -1, c)  # (B, pixels, C): a view in both layouts
    n = rows.shape[1]
    mean = rows.mean(dim=1)
    squares = torch.zeros(b, c, dtype=torch.float64)
    ones = torch.ones(min(block_pixels, n), dtype=torch.float32)
    for i in range(b):
        for start in range(0, n, block_pixels):
            dev = rows[i, start:start + block_pixels] - mean[i]
            squares[i] += ones[:dev.shape[0]] @ dev.mul_(dev)
    mean64, var64 = group_moments(mean.double(), squares / n, groups)
    scale = torch.rsqrt(var64 + norm.eps)
    shift = -mean64 * scale
    if weight is not None:
        scale, shift = scale * weight, shift * weight
    if bias is not None:
        shift = shift + bias
    scale, shift = scale.float(), shift.float()
    for i in range(b):  # block by block, so that scale, shift and activation make one pass over memory
        for start in range(0, n, block_pixels):
            block = rows[i, start:start + block_pixels]
            activation_in_place(act, torch.addcmul(shift[i], block, scale[i], out=block))
    return x
