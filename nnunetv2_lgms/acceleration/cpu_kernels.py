"""CPU training kernels: the same values and gradients as the PyTorch ops they stand in for, each returning None
where it does not apply. The accelerated modules of :mod:`nnunetv2_lgms.acceleration.cpu_training` call them.

* :func:`pointwise_pair_blockwise` (below): LGMSNet's decoder 1x1 stack, block by block.
* :func:`scalar_prelu`: a single-slope PReLU with a faster backward (GLIMS).
* :func:`pointwise_conv`: a 1x1 conv on an NC(D)HW map as batched GEMMs (GLIMS).
* :func:`depthwise_conv`: a stride-1 depthwise conv whose input gradient runs as a forward conv and, in 3D, whose
  weight gradient runs as 2D ones (:func:`depthwise3d_weight_grad`; LGMSNet-3D's LMS block, GLIMS's DACB).
* :func:`conv2d_gemm_weight_grad`: a dense 2D 'same' conv on a channels-last map whose weight gradient runs as one
  GEMM per kernel tap (LGMSNet-2D).
* :func:`group_norm_channels_last`: GroupNorm/InstanceNorm that keeps a channels-last map channels-last, with
  float64-accumulated statistics and a blockwise backward (LGMSNet-3D's InstanceNorms).

``pointwise_pair_blockwise``: ``[BatchNorm ->] conv1x1 -> GELU -> BatchNorm -> conv1x1`` computed block by block over
the pixels, with one wide map stored instead of six and the BatchNorms folded into the 1x1 convs.

Why: LGMSNet's decoder fusion expands to 4 x C_out channels at full resolution, between two 1x1 convs. Autograd keeps
three such maps for the backward (the conv output, the GELU output, the BatchNorm output) and creates three more
(their gradients); at nnU-Net's 2D plan (batch 12, 256 x 256, 64 channels) each is 200 MB, and on CPU every pass
over one, or a fresh allocation of one (page faults), costs about as much as the 1x1 conv itself.

:func:`pointwise_pair_blockwise` computes the same values and gradients on blocks of ``BLOCK_PIXELS`` pixels, keeps
only the GELU output ``A`` in full and recomputes ``U`` from the narrow input where the backward needs it, as
activation checkpointing does. With ``x`` the input (``z = s0 x + t0`` after the optional input BatchNorm),
``U = W1 z + b1``, ``A = GELU(U)`` and the middle BatchNorm ``s = gamma / sigma``, ``t = beta - mu s``:

* forward 0 (with an input norm): the batch moments of ``x``; ``W1 diag(s0)``, ``b1 + W1 t0`` as the first conv;
* forward 1: ``A`` per block, stored, accumulating its batch moments (shifted sums in float64);
* forward 2: ``out = A (W2 diag s)^T + (b2 + W2 t)``, one GEMM;
* backward 1: ``G = dout^T A``, one GEMM; the second conv's and the middle BatchNorm's gradients follow from ``G``
  and ``sum dout`` (the BatchNorm backward's batch reductions are ``sum dZ = W2^T sum dout`` and
  ``sum dZ A = sum_k W2 * G``);
* backward 2: ``U`` again per block, ``dA = dout W2 diag(s) + k1 + k2 A``, the GELU backward, ``dW1``, ``db1`` and
  ``dx``; with an input norm, ``dx`` gets its BatchNorm backward in one more pass (``k1' + k2' x``).

Storing ``A`` instead of recomputing it in forward 2 and backward 1 (two more GEMMs and GELUs per block) made the
three pairs' forward + backward 10-18 % faster at the 2D plan (level 0: 950 -> 792 ms, level 1: 420 -> 342 ms,
level 2: 338 -> 284 ms; medians of 5 interleaved, 2 cores of an AMD EPYC), for one 4 x C_out map per pair (350 MB
in all at levels 0-2; a training step's peak RSS 3.7 -> 4.1 GB). Storing ``U`` too was slower at level 0 (one more
200 MB map).

Only CPU training (float32 or float64, autocast off) in eager mode, with training-mode BatchNorms on batch
statistics and a channels-last input; elsewhere :func:`pointwise_pair_blockwise` returns None and callers run their
modules. Running statistics are updated as ``nn.BatchNorm`` updates them. Equality with the modules, forward and
backward: ``tests/test_cpu_training.py``.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

#: pixels per block of the blockwise kernels: a 64-channel float32 block is 2 MB and stays in L2
BLOCK_PIXELS = 8192


def is_compiling() -> bool:
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn and fn())


def pixels_dense(x: torch.Tensor) -> bool:
    """Whether ``x`` (B, C, *S) is dense with its channels last, i.e. a (pixels, C) matrix for GEMMs."""
    return x.movedim(1, -1).is_contiguous()


def channels_last_format(dim: int) -> torch.memory_format:
    """The channels-last memory format of a ``dim``-D feature map (NHWC / NDHWC)."""
    return {2: torch.channels_last, 3: torch.channels_last_3d}[dim]


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (a 2D or 3D feature map) in channels-last memory format; a no-op when it already is."""
    return x.contiguous(memory_format=channels_last_format(x.ndim - 2))


def is_channels_last(x: torch.Tensor) -> bool:
    if x.ndim not in (4, 5) or x.is_contiguous():
        return False
    return x.is_contiguous(memory_format=channels_last_format(x.ndim - 2))


def in_memory_format_of(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``x`` in ``reference``'s memory format (channels-last or contiguous): elementwise ops on mixed formats are
    slow."""
    return to_channels_last(x) if is_channels_last(reference) else x.contiguous()


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


def pointwise_pair_blockwise(x: Union[torch.Tensor, Sequence[torch.Tensor]], first: _ConvNd, act: nn.Module,
                             norm: nn.Module, second: _ConvNd, input_norm: Optional[nn.Module] = None,
                             block_pixels: int = BLOCK_PIXELS) -> Optional[torch.Tensor]:
    """``second(norm(act(first(input_norm(x)))))`` for 1x1 convs ``first``/``second``, a GELU ``act`` and
    BatchNorms ``norm`` (and optionally ``input_norm``) in training mode, computed blockwise (module docstring);
    ``(B, C_in, *S) -> (B, C_out, *S)``, channels-last. ``x`` may be given as parts that together are its channels
    (``torch.cat(x, 1)`` is then never formed: the first conv sums one GEMM per part). Updates the norms' running
    statistics as their forwards would. None where the path does not apply (nothing is updated then)."""
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    if not pointwise_pair_applies(parts, first, act, norm, second, input_norm):
        return None
    no_norm = (None, None, None, None, None, 0.0)
    return _PointwisePair.apply(first.weight, first.bias, second.weight, second.bias,
                                *_norm_args(norm), *(_norm_args(input_norm) if input_norm is not None else no_norm),
                                act.approximate, block_pixels, *parts)


def pointwise_pair_applies(parts: Sequence[torch.Tensor], first: _ConvNd, act: nn.Module, norm: nn.Module,
                           second: _ConvNd, input_norm: Optional[nn.Module] = None) -> bool:
    """Whether :func:`pointwise_pair_blockwise` takes these input parts and modules (it changes nothing)."""
    if not parts:
        return False
    x = parts[0]
    norms = (norm,) if input_norm is None else (norm, input_norm)
    channels = sum(p.shape[1] for p in parts)
    return (torch.is_grad_enabled() and not is_compiling() and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")  # the modules' autocast dtypes differ per op
            and x.dtype in (torch.float32, torch.float64) and x.ndim in (4, 5)
            and all(p.dtype == x.dtype and p.device == x.device and p.ndim == x.ndim and pixels_dense(p)
                    and p.shape[0] == x.shape[0] and p.shape[2:] == x.shape[2:] for p in parts)
            and x.shape[0] * x.shape[2:].numel() > 1 and type(act) is nn.GELU
            and all(_is_pointwise(c, x.dtype) for c in (first, second))
            and all(isinstance(n, _BatchNorm) and n.training and n.affine and n.weight.dtype == x.dtype
                    for n in norms)
            and channels == first.in_channels and first.out_channels == norm.num_features == second.in_channels
            and (input_norm is None or input_norm.num_features == channels))


def _is_pointwise(conv: nn.Module, dtype: torch.dtype) -> bool:
    """A plain 1x1 conv (:func:`_is_plain_pointwise`) with a bias."""
    return _is_plain_pointwise(conv, dtype) and conv.bias is not None


def _is_plain_pointwise(conv: nn.Module, dtype: torch.dtype) -> bool:
    """A 1x1 conv module: stride 1, no padding, one group, not transposed, parameters of ``dtype``."""
    return (isinstance(conv, _ConvNd) and not conv.transposed and conv.groups == 1
            and conv.weight.shape[2:].numel() == 1 and all(s == 1 for s in conv.stride)
            and not isinstance(conv.padding, str) and all(p == 0 for p in conv.padding)
            and conv.weight.dtype == dtype and (conv.bias is None or conv.bias.dtype == dtype))


def _norm_args(norm: _BatchNorm):
    """weight, bias, running mean, running var, running-average factor (None: no running statistics), eps."""
    return norm.weight, norm.bias, norm.running_mean, norm.running_var, _running_stats_factor(norm), norm.eps


def _running_stats_factor(norm: _BatchNorm) -> Optional[float]:
    """The running-average factor ``nn.BatchNorm.forward`` uses (counting this batch, as it does), or None if the
    norm keeps no running statistics."""
    if not norm.track_running_stats or norm.running_mean is None:
        return None
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
    if norm.momentum is None:
        return 1.0 / float(norm.num_batches_tracked)
    return norm.momentum


class _Blocks:
    """Blocks of rows of (P, C_i) pixel matrices (the parts of the input's channels); per-column sums as GEMMs; and,
    once :meth:`with_first_conv` has set its weights, the first 1x1 conv + GELU of a block into reused buffers
    (``U``, ``A``)."""

    def __init__(self, pixels: Sequence[torch.Tensor], block: int):
        self.pixels, self.n = list(pixels), pixels[0].shape[0]
        self.block = min(block, self.n)
        self.ones = pixels[0].new_ones(1, self.block)

    def with_first_conv(self, w1t: torch.Tensor, b1: torch.Tensor, approximate: str, extra_buffers: int = 0):
        self.w1t_parts = w1t.split([p.shape[1] for p in self.pixels])
        self.b1, self.approximate = b1, approximate
        self.u, self.a, *self.extra = [self.pixels[0].new_empty(self.block, w1t.shape[1])
                                       for _ in range(2 + extra_buffers)]
        return self

    def ranges(self):
        return _ranges(self.n, self.block)

    def first_conv(self, start: int, stop: int) -> torch.Tensor:
        """``U`` of the block (in the ``U`` buffer)."""
        u = self.u[:stop - start]
        torch.addmm(self.b1, self.pixels[0][start:stop], self.w1t_parts[0], out=u)
        for pixels, w1t in zip(self.pixels[1:], self.w1t_parts[1:]):
            u.addmm_(pixels[start:stop], w1t)
        return u

    def activated(self, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``U`` and ``A = GELU(U)`` of the block (in the ``U`` and ``A`` buffers)."""
        u = self.first_conv(start, stop)
        return u, torch.ops.aten.gelu.out(u, approximate=self.approximate, out=self.a[:stop - start])

    def column_sum(self, m: torch.Tensor) -> torch.Tensor:
        """Per-column sum of a block, as a GEMM (much faster than ``sum(0)`` reductions over rows here)."""
        return torch.mm(self.ones[:, :m.shape[0]], m)[0]


def _moments(blocks: Iterable[torch.Tensor], column_sum, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance per column over ``blocks`` (scratch blocks, overwritten here): shifted sums
    (shift: the first block's mean) accumulated in float64."""
    sum1 = sum2 = shift = None
    for block in blocks:
        if shift is None:
            shift = block.mean(0)
            sum1 = torch.zeros(block.shape[1], dtype=torch.float64)
            sum2 = torch.zeros_like(sum1)
        block.sub_(shift)
        sum1 += column_sum(block)
        sum2 += column_sum(block.mul_(block))
    mean_shifted = sum1 / n
    var = (sum2 / n - mean_shifted * mean_shifted).clamp_min_(0)
    return mean_shifted + shift.double(), var


def _batch_norm_folding(moments, n, weight, bias, running_mean, running_var, factor, eps, dtype):
    """Update the running statistics; return (mean, invstd, scale, shift) of the training-mode BatchNorm."""
    mean64, var64 = moments
    mean, var = mean64.to(dtype), var64.to(dtype)
    if factor is not None:
        running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        running_var.mul_(1 - factor).add_((var64 * (n / (n - 1))).to(dtype), alpha=factor)
    invstd = torch.rsqrt(var + eps)
    scale = weight * invstd
    return mean, invstd, scale, bias - mean * scale


def _norm_backward_coefficients(scale, invstd, mean, grad_beta, grad_gamma, n):
    """The training-mode BatchNorm backward as ``dx = scale * dz + k1 + k2 * x``, given ``sum dz`` (``grad_beta``)
    and ``sum dz * xhat`` (``grad_gamma``)."""
    k2 = -scale * grad_gamma * invstd / n
    return -scale * grad_beta / n - k2 * mean, k2


class _PointwisePair(torch.autograd.Function):

    @staticmethod
    def forward(ctx, w1, b1, w2, b2, gamma, beta, running_mean, running_var, factor, eps,
                gamma0, beta0, running_mean0, running_var0, factor0, eps0, approximate, block, *parts):
        x = parts[0]
        pixels = [p.movedim(1, -1).reshape(-1, p.shape[1]) for p in parts]  # views: the parts are channels-last dense
        n = pixels[0].shape[0]
        w1m, w2m = w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)
        blocks = _Blocks(pixels, block)
        has_input_norm = gamma0 is not None
        if has_input_norm:  # forward 0: fold the input BatchNorm into the first conv
            moments = []
            for part in pixels:
                copy = part.new_empty(blocks.block, part.shape[1])
                x_blocks = (copy[:stop - start].copy_(part[start:stop]) for start, stop in blocks.ranges())
                moments.append(_moments(x_blocks, blocks.column_sum, n))
            moments = tuple(torch.cat(m) for m in zip(*moments))
            mean0, invstd0, scale0, shift0 = _batch_norm_folding(moments, n, gamma0, beta0, running_mean0,
                                                                 running_var0, factor0, eps0, x.dtype)
            w1f, b1f = w1m * scale0, b1 + w1m @ shift0
        else:
            mean0 = invstd0 = scale0 = shift0 = None
            w1f, b1f = w1m, b1
        blocks.with_first_conv(w1f.t(), b1f, approximate)
        activated = x.new_empty(n, w1m.shape[0])  # A, kept for forward 2 and backward 1

        def middle():  # forward 1: A block by block; its moments on a scratch copy (which they overwrite)
            for start, stop in blocks.ranges():
                a = blocks.activated(start, stop)[1]
                activated[start:stop].copy_(a)
                yield a

        mean, invstd, scale, shift = _batch_norm_folding(_moments(middle(), blocks.column_sum, n), n, gamma, beta,
                                                         running_mean, running_var, factor, eps, x.dtype)
        w2f_t, b2f = (w2m * scale).t(), b2 + w2m @ shift
        out = x.new_empty((*x.movedim(1, -1).shape[:-1], w2m.shape[0]))  # forward 2
        torch.addmm(b2f, activated, w2f_t, out=out.view(-1, w2m.shape[0]))

        ctx.save_for_backward(*parts, w1, w1f, b1f, w2, mean, invstd, scale, shift, activated,
                              *((mean0, invstd0, scale0, shift0) if has_input_norm else ()))
        ctx.approximate, ctx.block, ctx.num_parts = approximate, block, len(parts)
        return out.movedim(-1, 1)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        parts = saved[:ctx.num_parts]
        w1, w1f, b1f, w2, mean, invstd, scale, shift, activated, *input_norm = saved[ctx.num_parts:]
        x = parts[0]
        pixels = [p.movedim(1, -1).reshape(-1, p.shape[1]) for p in parts]
        widths = [p.shape[1] for p in pixels]
        n = pixels[0].shape[0]
        w2m = w2.reshape(w2.shape[0], -1)
        dout = grad_out.movedim(1, -1).reshape(-1, grad_out.shape[1])  # copies only if not channels-last dense
        blocks = _Blocks(pixels, ctx.block).with_first_conv(w1f.t(), b1f, ctx.approximate, extra_buffers=1)

        g = dout.t() @ activated  # backward 1: G = dout^T A, and sum dout
        dout_sum = torch.zeros(w2m.shape[0], dtype=torch.float64)
        for start, stop in blocks.ranges():
            dout_sum += blocks.column_sum(dout[start:stop])
        dout_sum = dout_sum.to(x.dtype)
        grad_w2 = g * scale + torch.outer(dout_sum, shift)  # dout^T (A s + t)
        grad_beta = w2m.t() @ dout_sum
        grad_gamma = ((w2m * g).sum(0) - mean * grad_beta) * invstd
        k1, k2 = _norm_backward_coefficients(scale, invstd, mean, grad_beta, grad_gamma, n)
        w2f = w2m * scale

        grad_parts = [p.new_empty(p.movedim(1, -1).shape) for p in parts]  # backward 2
        grad_pixels = [g.view(-1, g.shape[-1]) for g in grad_parts]
        grad_w1f = torch.zeros_like(w1f)
        grad_w1f_parts, w1f_parts = grad_w1f.split(widths, dim=1), w1f.split(widths, dim=1)
        grad_b1 = torch.zeros(w1f.shape[0], dtype=torch.float64)
        for start, stop in blocks.ranges():
            u = blocks.first_conv(start, stop)
            da = blocks.extra[0][:stop - start]
            torch.addmm(k1, dout[start:stop], w2f, out=da)
            da.addcmul_(activated[start:stop], k2)
            du = torch.ops.aten.gelu_backward.grad_input(da, u, approximate=ctx.approximate,
                                                         grad_input=blocks.a[:stop - start])
            grad_b1 += blocks.column_sum(du)
            for part, grad_w, w, grad in zip(pixels, grad_w1f_parts, w1f_parts, grad_pixels):
                grad_w.addmm_(du.t(), part[start:stop])
                torch.mm(du, w, out=grad[start:stop])
        grad_b1 = grad_b1.to(x.dtype)

        if input_norm:  # the input BatchNorm's backward; the first conv's gradients w.r.t. its unfolded weights
            mean0, invstd0, scale0, shift0 = input_norm
            w1m = w1.reshape(w1.shape[0], -1)
            grad_beta0 = grad_b1 @ w1m
            grad_gamma0 = ((w1m * grad_w1f).sum(0) - mean0 * grad_beta0) * invstd0
            k1_0, k2_0 = _norm_backward_coefficients(scale0, invstd0, mean0, grad_beta0, grad_gamma0, n)
            # the parts' gradients hold dz0 * scale0 (the folded conv's input gradient)
            for part, grad, k1_part, k2_part in zip(pixels, grad_pixels, k1_0.split(widths), k2_0.split(widths)):
                for start, stop in blocks.ranges():
                    grad[start:stop].addcmul_(part[start:stop], k2_part).add_(k1_part)
            grad_w1 = grad_w1f * scale0 + torch.outer(grad_b1, shift0)
        else:
            grad_w1, grad_gamma0, grad_beta0 = grad_w1f, None, None
        return (grad_w1.reshape(w1.shape), grad_b1, grad_w2.reshape(w2.shape), dout_sum, grad_gamma, grad_beta,
                None, None, None, None, grad_gamma0, grad_beta0, None, None, None, None, None, None,
                *(g.movedim(-1, 1) for g in grad_parts))


def scalar_prelu(x: torch.Tensor, weight: torch.Tensor, in_place: bool = False) -> Optional[torch.Tensor]:
    """``F.prelu(x, weight)`` for a single learnt slope, with a faster backward on CPU; None where it does not
    apply (not CPU, not float32/64, autocast, ``torch.compile``, more than one slope, no autograd).

    Why: PyTorch's CPU PReLU backward with one slope took ~170 ms on GLIMS's level-0 map (9 x 24 x 40 x 56 x 40)
    against ~75 ms for a leaky ReLU's; here the input gradient is the leaky-ReLU backward with the slope's value and
    the slope's gradient one masked dot product, ``sum(dy * min(x, 0))``.

    ``in_place``: the caller's promise that nothing else uses ``x`` and that the op which made it does not need its
    output for its backward (a norm). Then, for a positive slope, ``x`` is overwritten and the backward reads the
    signs and ``min(x, 0) = min(y, 0) / slope`` from the output (no second full-size map). GLIMS's level 0, GroupNorm
    + PReLU forward and backward: 161-171 ms -> 111-124 ms (2 cores). Views, leaves and slopes <= 0 (whose output
    does not tell the input's sign) take the out-of-place path.
    """
    if not (torch.is_grad_enabled() and x.device.type == "cpu" and weight.numel() == 1
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and not is_compiling() and not torch.is_autocast_enabled("cpu")):
        return None
    if in_place and x.grad_fn is not None and x._base is None and float(weight.detach()) > 0:
        return _ScalarPReLUInPlace.apply(x, weight)
    return _ScalarPReLU.apply(x, weight)


class _ScalarPReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.leaky_relu(x, float(weight))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.leaky_relu_backward(grad_out, x, float(weight), False)
        if ctx.needs_input_grad[1]:
            grad_weight = x.clamp(max=0).mul_(grad_out).sum().reshape(weight.shape)
        return grad_x, grad_weight


def pointwise_conv(conv: nn.Module, x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> Optional[torch.Tensor]:
    """``conv(x)`` for a 1x1 conv (stride 1, no padding, one group) on a contiguous NC(D)HW CPU map with autograd,
    as one batched GEMM per sample, ``W (C_out, C_in) @ x (C_in, pixels) + b``; its backward is GEMMs too. ``x`` may
    also be several maps that together are the conv's input channels: ``conv(torch.cat(x, dim=1))`` as one GEMM
    per part, summed in place, so that the concatenation is never formed and each part gets its own contiguous
    gradient. None where it does not apply (no autograd, not CPU, autocast, ``torch.compile``, a map not contiguous
    NC(D)HW, parts of other batch or spatial sizes, another conv).

    Why: oneDNN runs these convs on NC(D)HW maps through reorders to its blocked layout. At GLIMS's level 0 (9 x 72 x
    40 x 56 x 40 -> 48 channels) forward + backward took 661-734 ms as a conv, 397-427 ms as a conv on a channels-last
    map and 310 ms as this GEMM (2 cores). GLIMS trains NC(D)HW because its per-channel norms are faster there.
    """
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    if not (torch.is_grad_enabled() and not is_compiling() and not torch.is_autocast_enabled("cpu") and parts
            and _is_plain_pointwise(conv, parts[0].dtype)
            and sum(p.shape[1] for p in parts) == conv.in_channels
            and all(p.device.type == "cpu" and p.ndim in (4, 5) and p.is_contiguous() and p.dtype == parts[0].dtype
                    and p.dtype in (torch.float32, torch.float64) and p.shape[0] == parts[0].shape[0]
                    and p.shape[2:] == parts[0].shape[2:] for p in parts)):
        return None
    b, size = parts[0].shape[0], parts[0].shape[2:]
    pixels = size.numel()
    weights = conv.weight.reshape(conv.out_channels, conv.in_channels).split([p.shape[1] for p in parts], dim=1)
    y = None
    for part, weight in zip(parts, weights):
        columns, weight = part.view(b, part.shape[1], pixels), weight.expand(b, -1, -1)
        if y is not None:
            y = y.baddbmm_(weight, columns)
        elif conv.bias is None:
            y = torch.bmm(weight, columns)
        else:
            y = torch.baddbmm(conv.bias.view(1, -1, 1).expand(b, -1, pixels), weight, columns)
    return y.view(b, conv.out_channels, *size)


class _ScalarPReLUInPlace(torch.autograd.Function):
    """The in-place form of :class:`_ScalarPReLU` for a positive slope ``a``: ``y = leaky_relu_(x, a)``."""

    @staticmethod
    def forward(ctx, x, weight):
        slope = float(weight)
        ctx.mark_dirty(x)
        torch.nn.functional.leaky_relu_(x, slope)
        ctx.save_for_backward(x, weight)
        ctx.slope = slope
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:  # sign(y) = sign(x) for a positive slope
            grad_x = torch.ops.aten.leaky_relu_backward(grad_out, y, ctx.slope, False)
        if ctx.needs_input_grad[1]:  # sum(dy * min(x, 0)) = sum(dy * min(y, 0)) / a, block by block
            flat_y, flat_dy = _flat_in_memory_order(y, grad_out)
            block = min(flat_y.numel(), 1 << 20)
            buffer = flat_y.new_empty(block)
            total = torch.zeros((), dtype=torch.float64)
            for start, stop in _ranges(flat_y.numel(), block):
                negative = torch.clamp(flat_y[start:stop], max=0, out=buffer[:stop - start])
                total += torch.dot(negative, flat_dy[start:stop])
            grad_weight = (total / ctx.slope).to(weight.dtype).reshape(weight.shape)
        return grad_x, grad_weight


def _flat_in_memory_order(x: torch.Tensor, other: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``other`` (same shape) as 1-D tensors with matching elements, ordered as ``x`` lies in memory:
    views where both are dense in ``x``'s layout (channels-last maps included, which ``reshape(-1)`` would copy),
    else ``other`` copied into that order. At GLIMS's level 0 such copies of 77 MB took 24-64 ms each."""
    order = sorted(range(x.ndim), key=lambda i: -x.stride(i))  # (stable: size-1 axes keep their place)
    x_ordered, other_ordered = x.permute(order), other.permute(order)
    if not x_ordered.is_contiguous():
        return x.reshape(-1), other.reshape(-1)
    return x_ordered.view(-1), other_ordered.reshape(-1)


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: Sequence[int],
                   dilation: Sequence[int]) -> Optional[torch.Tensor]:
    """``F.conv2d/conv3d(x, weight, bias, stride=1, padding, dilation, groups=C)`` for a depthwise conv (one kernel
    per channel) with a faster backward on CPU; None where it does not apply (not CPU training, autocast,
    ``torch.compile``, not depthwise, or a padding beyond ``dilation * (kernel - 1)``).

    Why: PyTorch's CPU backward computes the input gradient of these convs far slower than the same work done as a
    forward conv. With stride 1 the input gradient is the depthwise conv of the output gradient with the flipped
    kernel (padding ``dilation * (kernel - 1) - padding``). At LGMSNet-3D's level 0 (channels-last, 9 x 4 x 40 x 56
    x 40) the input gradient of the 9x9x9 conv took 352 ms in ``convolution_backward`` and 109 ms as that forward
    conv (7x7x7: 135 against 53 ms); at GLIMS's level 0 (24 channels, 3x3x3) 156-188 against 43 ms. In 3D the
    weight gradient runs as 2D weight gradients on the depth-folded maps where both are channels-last
    (:func:`depthwise3d_weight_grad`), else, like the 2D one, in ``convolution_backward``.
    """
    dims = x.ndim - 2
    kernel = weight.shape[2:]
    if not (torch.is_grad_enabled() and x.device.type == "cpu" and dims in (2, 3) and not is_compiling()
            and not torch.is_autocast_enabled("cpu") and x.dtype in (torch.float32, torch.float64)
            and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
            and weight.shape[0] == x.shape[1] and weight.shape[1] == 1 and len(padding) == len(dilation) == dims
            and all(0 <= p <= d * (k - 1) for p, d, k in zip(padding, dilation, kernel))):
        return None
    return _DepthwiseConv.apply(x, weight, bias, tuple(padding), tuple(dilation))


def depthwise_conv_module(conv: _ConvNd, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``conv(x)`` through :func:`depthwise_conv` for a depthwise ``nn.Conv2d``/``nn.Conv3d`` module (stride 1, zero
    padding given as numbers); None where it does not apply."""
    if (conv.transposed or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
            or any(s != 1 for s in conv.stride) or not conv.groups == conv.in_channels == conv.out_channels):
        return None
    return depthwise_conv(x, conv.weight, conv.bias, conv.padding, conv.dilation)


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):
        conv = F.conv2d if x.ndim == 4 else F.conv3d
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, bias is not None
        return conv(x, weight, bias, 1, padding, dilation, x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        dims, channels = x.ndim - 2, x.shape[1]
        if pixels_dense(x) and not pixels_dense(grad_out):
            # both convs below are slow on mixed or NC(D)HW layouts (GLIMS's level 0: an NCDHW gradient of the
            # channels-last conv made its weight gradient 590 ms, against 50 for the copy)
            grad_out = grad_out.movedim(1, -1).contiguous().movedim(-1, 1)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            conv = F.conv2d if dims == 2 else F.conv3d
            flipped_padding = [d * (k - 1) - p for p, d, k in zip(ctx.padding, ctx.dilation, weight.shape[2:])]
            grad_x = conv(grad_out, weight.flip(list(range(2, x.ndim))), None, 1, flipped_padding, ctx.dilation,
                          channels)
        wants_bias = ctx.has_bias and ctx.needs_input_grad[2]
        if dims == 3 and ctx.needs_input_grad[1]:
            grad_weight = depthwise3d_weight_grad(x, grad_out, weight.shape[2:], ctx.padding, ctx.dilation)
            if grad_weight is not None and wants_bias:
                grad_bias = grad_out.sum(dim=(0, 2, 3, 4))
        if grad_weight is None and (ctx.needs_input_grad[1] or wants_bias):
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out, x, weight, [channels] if ctx.has_bias else None, [1] * dims, list(ctx.padding),
                list(ctx.dilation), False, [0] * dims, channels, [False, ctx.needs_input_grad[1], wants_bias])
        return grad_x, grad_weight, grad_bias, None, None


#: pixels per 2D call in :func:`depthwise3d_weight_grad`. oneDNN's 2D kernel sums a call's products in float32 one
#: after another; at GLIMS's level 0 (3x3x3, 24 channels, 9 x 40 x 56 x 40) one call per kernel depth gave 2.4e-5
#: relative error, calls of 90 k pixels summed in float64 6.6e-6 (the 3D kernel 1e-6). The calls cost time: level 0
#: 47 -> 50 ms, the dilation-2 sub-grid stack (72 x 20 x 28 x 20, calls of 67 k pixels) 35 -> 48 ms
DEPTHWISE_WEIGHT_GRAD_PIXELS = 65536


def depthwise3d_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel: Sequence[int], padding: Sequence[int],
                            dilation: Sequence[int], pixels: int = DEPTHWISE_WEIGHT_GRAD_PIXELS
                            ) -> Optional[torch.Tensor]:
    """Weight gradient ``(C, 1, kD, kH, kW)`` of a stride-1 depthwise 3D conv whose output has its input's depth
    (``x``, ``grad_out``: ``(B, C, D, H, W)``), as 2D depthwise weight gradients with the depth folded into the
    batch; None where that does not apply (either map not channels-last, another output depth, or a kernel depth
    offset not below ``D``).

    Why: oneDNN's 3D depthwise weight gradient is slow with AVX2. At GLIMS's Hippocampus level 0 (3x3x3, 24
    channels, 9 x 40 x 56 x 40) it took 464 ms, as 2D weight gradients 53 ms; on the sub-grid stack of the
    dilation-2 conv (72 x 20 x 28 x 20) 754 against 52 ms; LGMSNet-3D's 9x9x9 on 4 channels 699 against 455 ms
    (2 cores of an AMD EPYC).

    How: as ``(B*D, C, H, W)`` images (a view of a channels-last map), kernel depth ``kd`` correlates output image
    ``r`` with input image ``r + o``, ``o = kd * dilation_D - padding_D``: a 2D depthwise weight gradient with the
    in-plane padding and dilation. Over the folded batch, a sample's last (``o > 0``) or first (``o < 0``) ``|o|``
    output images then meet the neighbouring sample's input images where the conv's zero padding lies; those pairs
    are computed on their own and subtracted. Calls of at most ``pixels`` pixels, summed in float64.
    """
    if not (x.ndim == 5 and grad_out.shape == x.shape and pixels_dense(x) and pixels_dense(grad_out)):
        return None
    b, c, depth, h, w = x.shape
    offsets = [kd * dilation[0] - padding[0] for kd in range(kernel[0])]
    if any(abs(o) >= depth for o in offsets):
        return None
    images_x, images_g = (t.movedim(1, -1).reshape(b * depth, h, w, c).movedim(-1, 1) for t in (x, grad_out))
    in_plane = torch.empty((c, 1, *kernel[1:]), dtype=x.dtype)  # (only its shape is read)

    def weight_grad(g: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            g, inp, in_plane, None, [1, 1], list(padding[1:]), list(dilation[1:]), False, [0, 0], c,
            [False, True, False])[1].double()

    grad = torch.zeros((c, 1, *kernel), dtype=torch.float64)
    step = max(1, pixels // (h * w))
    for kd, o in enumerate(offsets):
        n = b * depth - abs(o)
        g_rows, x_rows = (images_g[:n], images_x[o:]) if o >= 0 else (images_g[-o:], images_x[:n])
        for start in range(0, n, step):
            grad[:, :, kd] += weight_grad(g_rows[start:start + step], x_rows[start:start + step])
        for j in range(abs(o) if b > 1 else 0):  # the pairs across samples, one image per sample pair
            if o > 0:
                grad[:, :, kd] -= weight_grad(grad_out[:-1, :, depth - o + j], x[1:, :, j])
            else:
                grad[:, :, kd] -= weight_grad(grad_out[1:, :, j], x[:-1, :, depth + o + j])
    return grad.to(x.dtype)


#: :func:`conv2d_gemm_weight_grad` takes convs with at least this many ``C_in * C_out`` (measured: 16 x 16 and 32 x 16
#: convs at 256 x 256 were slower, 32 x 32 and wider faster)
GEMM_WEIGHT_GRAD_MIN_CHANNEL_PAIRS = 1024


def conv2d_gemm_weight_grad(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            padding: Sequence[int], stride: Sequence[int] = (1, 1), dilation: Sequence[int] = (1, 1),
                            block_pixels: int = BLOCK_PIXELS) -> Optional[torch.Tensor]:
    """``F.conv2d(x, weight, bias, stride, padding, dilation)`` for a dense (one group) conv with stride 1, no
    dilation, odd kernels (not 1x1) and 'same' zero padding on a channels-last CPU map, whose weight gradient runs as
    GEMMs; None where it does not apply (no autograd, not CPU float32/64, autocast, ``torch.compile``, not
    channels-last dense, fewer than :data:`GEMM_WEIGHT_GRAD_MIN_CHANNEL_PAIRS` channel pairs, another conv).

    Why: oneDNN's weight gradient of these convs (AVX2) took about three times its forward: at nnU-Net's 2D plan
    (batch 12) the 128 -> 64 conv at 64 x 64 took 132 ms for its weight gradient against 49 ms forward. Here, with
    ``x`` and the output gradient ``g`` zero-padded into flat ``(pixels, C)`` matrices on the padded grid (``g`` zero
    on the border), kernel tap ``(i, j)`` reads ``x`` at a constant row offset ``(i - p) * W_pad + (j - p)`` from
    ``g``: ``dW[:, :, i, j] = g^T x_shifted``, one GEMM per tap, done block by block over the rows so that both stay in
    cache. Same 132 ms case: 82 ms; 384 -> 128 at 32 x 32: 159 -> 106 ms; 64 -> 32 at 128 x 128: 182 -> 117 ms (2
    cores of an AMD EPYC). The input gradient stays with ``convolution_backward`` (as fast as the forward).
    """
    if not (torch.is_grad_enabled() and x.device.type == "cpu" and x.ndim == 4 and not is_compiling()
            and not torch.is_autocast_enabled("cpu") and x.dtype in (torch.float32, torch.float64)
            and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype) and pixels_dense(x)
            and weight.shape[1] == x.shape[1] and all(v == 1 for v in (*stride, *dilation))
            and weight.shape[0] * weight.shape[1] >= GEMM_WEIGHT_GRAD_MIN_CHANNEL_PAIRS
            and weight.shape[2:].numel() > 1  # (oneDNN's 1x1 weight gradient was as fast as one GEMM)
            and len(padding) == 2 and all(k % 2 == 1 and p == k // 2 for k, p in zip(weight.shape[2:], padding))):
        return None
    return _Conv2dGemmWeightGrad.apply(x, weight, bias, block_pixels)


def conv2d_gemm_weight_grad_module(conv: _ConvNd, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``conv(x)`` through :func:`conv2d_gemm_weight_grad` for an ``nn.Conv2d`` (one group, stride 1, no dilation,
    zero padding given as numbers); None where it does not apply."""
    if (not isinstance(conv, nn.Conv2d) or conv.transposed or conv.groups != 1 or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str)):
        return None
    return conv2d_gemm_weight_grad(x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation)


class _Conv2dGemmWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, block_pixels):
        ctx.padding = [k // 2 for k in weight.shape[2:]]
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.block_pixels = bias is not None, block_pixels
        return F.conv2d(x, weight, bias, 1, ctx.padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], ctx.padding, [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_weight, grad_bias = _conv2d_weight_grad_by_taps(x, grad_out, weight.shape, ctx.block_pixels)
            grad_bias = grad_bias if ctx.has_bias and ctx.needs_input_grad[2] else None
            grad_weight = grad_weight if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, grad_bias, None


def _conv2d_weight_grad_by_taps(x: torch.Tensor, grad_out: torch.Tensor, weight_shape: Sequence[int],
                                block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradients of a stride-1 'same' conv, one GEMM per tap on zero-padded flat pixel matrices
    (:func:`conv2d_gemm_weight_grad`)."""
    c_out, c_in, k_h, k_w = weight_shape
    b, _, h, w = x.shape
    p_h, p_w = k_h // 2, k_w // 2
    h_pad, w_pad = h + 2 * p_h, w + 2 * p_w
    n = b * h_pad * w_pad
    margin = p_h * w_pad + p_w  # the largest row offset of a tap: shifted reads stay inside the buffer
    x_flat = x.new_zeros(n + 2 * margin, c_in)
    x_flat[margin:margin + n].view(b, h_pad, w_pad, c_in)[:, p_h:p_h + h, p_w:p_w + w].copy_(x.permute(0, 2, 3, 1))
    g_flat = grad_out.new_zeros(n, c_out)  # zero on the border: those rows add nothing
    g_flat.view(b, h_pad, w_pad, c_out)[:, p_h:p_h + h, p_w:p_w + w].copy_(grad_out.permute(0, 2, 3, 1))
    taps = [(i, j, margin + (i - p_h) * w_pad + (j - p_w)) for i in range(k_h) for j in range(k_w)]
    grad_taps = x.new_zeros(k_h, k_w, c_out, c_in)
    ones = x.new_ones(1, min(block, n))
    grad_bias = torch.zeros(c_out, dtype=torch.float64)
    for start, stop in _ranges(n, block):
        g_t = g_flat[start:stop].t()
        for i, j, offset in taps:
            grad_taps[i, j].addmm_(g_t, x_flat[offset + start:offset + stop])
        grad_bias += torch.mm(ones[:, :stop - start], g_flat[start:stop])[0]
    return grad_taps.permute(2, 3, 0, 1).contiguous(), grad_bias.to(x.dtype)


def group_norm_channels_last(x: torch.Tensor, groups: int, weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], eps: float) -> Optional[torch.Tensor]:
    """``F.group_norm(x, groups, weight, bias, eps)`` for a channels-last CPU map, with a channels-last output;
    ``groups = C`` is an InstanceNorm without running statistics (``F.instance_norm``). None where it does not apply
    (not CPU float32/64, autocast, ``torch.compile``, not channels-last dense, one pixel per channel).

    Why: ``nn.InstanceNorm`` copies a channels-last map to NC(D)HW (and returns that layout). PyTorch's channels-last
    GroupNorm keeps the layout but its backward is slow, and its float32 forward loses the variance to cancellation
    when a channel's mean is large against its spread (mean 10, std 0.1: errors of 0.1 in the output). Here the
    (B, pixels, C) view is reduced block by block with GEMVs, accumulated in float64:

    * forward: per-channel sums of ``x - s`` and ``(x - s)^2`` in one pass, ``s`` the first block's mean (shifted
      moments, no cancellation); a group's statistics combine its channels'; then ``(x - mean) * scale + bias``
      block by block;
    * backward: ``sum dy`` and ``sum dy * xhat`` per channel in one pass, then ``dx = a dy + k2 (x - mean) + k1``
      block by block (``a``, ``k1``, ``k2`` per sample and channel).

    Forward + backward at LGMSNet-3D's level 0 (9 x C x 40 x 56 x 40, InstanceNorm with affine), against PyTorch's
    channels-last GroupNorm, two runs: 91-100 against 114-125 ms (C = 16), 169-193 against 244-251 ms (32), 333-398
    against 496-561 ms (64); the forward alone is slower (39-44 against 25 ms at C = 16), the backward much faster.
    """
    if not (x.device.type == "cpu" and x.ndim in (4, 5) and x.dtype in (torch.float32, torch.float64)
            and not is_compiling() and not torch.is_autocast_enabled("cpu")
            and pixels_dense(x) and x.shape[2:].numel() > 1 and groups > 0 and x.shape[1] % groups == 0
            and all(t is None or (t.dtype == x.dtype and t.shape == x.shape[1:2]) for t in (weight, bias))):
        return None
    return _GroupNormChannelsLast.apply(x, groups, weight, bias, eps)


def _channel_block(channels: int) -> int:
    """Pixels per block for per-channel reductions: about 2 MB of float32 (in L2)."""
    return max(BLOCK_PIXELS, BLOCK_PIXELS * 64 // max(channels, 1))


def _ranges(n: int, block: int):
    return ((start, min(start + block, n)) for start in range(0, n, block))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) channels-last -> its (B, pixels, C) view (a copy only if ``x`` is not channels-last dense)."""
    return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])


class _GroupNormChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps):
        rows = _rows(x)
        b, n, c = rows.shape
        block = _channel_block(c)
        ones = rows.new_ones(min(block, n))
        buffer = rows.new_empty(min(block, n), c)
        moments = [_moments((buffer[:stop - start].copy_(rows[i, start:stop]) for start, stop in _ranges(n, block)),
                            lambda m: ones[:m.shape[0]] @ m, n) for i in range(b)]
        mean64, var64 = group_moments(torch.stack([m for m, _ in moments]), torch.stack([v for _, v in moments]),
                                      groups)
        mean, invstd = mean64.to(x.dtype), torch.rsqrt(var64 + eps).to(x.dtype)
        scale = invstd if weight is None else invstd * weight
        out = torch.empty_like(x, memory_format=torch.preserve_format)
        out_rows = _rows(out)
        for i in range(b):  # (x - mean) * scale, not x * scale + offset: no cancellation where mean >> spread
            for start in range(0, n, block):
                dest = torch.sub(rows[i, start:start + block], mean[i], out=out_rows[i, start:start + block])
                dest.mul_(scale[i]) if bias is None else torch.addcmul(bias, dest, scale[i], out=dest)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.groups, ctx.has_bias = groups, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        rows, dy = _rows(x), _rows(grad_out)
        b, n, c = rows.shape
        block = _channel_block(c)
        ones = rows.new_ones(min(block, n))
        buffer = rows.new_empty(min(block, n), c)
        sum_dy = torch.zeros(b, c, dtype=torch.float64)
        sum_dy_xhat = torch.zeros(b, c, dtype=torch.float64)
        for i in range(b):
            for start, stop in _ranges(n, block):
                xhat = torch.sub(rows[i, start:stop], mean[i], out=buffer[:stop - start]).mul_(invstd[i])
                sum_dy[i] += ones[:stop - start] @ dy[i, start:stop]
                sum_dy_xhat[i] += ones[:stop - start] @ xhat.mul_(dy[i, start:stop])
        sum_dy, sum_dy_xhat = sum_dy.to(x.dtype), sum_dy_xhat.to(x.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # with dxhat = w dy: dx = invstd (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat)), means over the group
            a = invstd if weight is None else invstd * weight
            w = 1 if weight is None else weight
            k2 = -invstd * invstd * per_group_mean(w * sum_dy_xhat, ctx.groups) / n
            k1 = -invstd * per_group_mean(w * sum_dy, ctx.groups) / n
            grad_x = torch.empty_like(x, memory_format=torch.preserve_format)
            grad_rows = _rows(grad_x)
            for i in range(b):  # a dy + k2 (x - mean) + k1
                for start in range(0, n, block):
                    dest = torch.sub(rows[i, start:start + block], mean[i], out=grad_rows[i, start:start + block])
                    torch.addcmul(k1[i], dest, k2[i], out=dest).addcmul_(dy[i, start:start + block], a[i])
        if weight is not None and ctx.needs_input_grad[2]:
            grad_weight = sum_dy_xhat.sum(0)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = sum_dy.sum(0)
        return grad_x, None, grad_weight, grad_bias, None


def merged_depthwise_conv2d(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
                            ) -> torch.Tensor:
    """``cat_k conv2d(x_k, w_k, b_k)`` over consecutive channel groups ``x_k`` (depthwise convs of different odd
    kernel sizes, 'same' padding) as one depthwise conv over all channels, each group's kernel zero-padded (centred)
    to the largest. The padded taps add FLOPs, but the split, the per-group convs on narrow slices and the
    concatenation cost more on CPU: LGMSNet's LMS stage at nnU-Net's 2D plan (16 channels, batch 12, 256 x 256) took
    30 ms instead of 85 ms in inference and 301 ms instead of 383 ms forward + backward (2 cores). With autograd
    (not under autocast, which differentiates the plain ops) its own backward (:class:`_MergedDepthwiseConv2d`)."""
    if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
        params = [t for pair in zip(weights, biases) for t in pair]
        return _MergedDepthwiseConv2d.apply(x, *params)
    return _merged_depthwise_forward(x, weights, biases)[0]


def _merged_depthwise_forward(x, weights, biases):
    kernel = [max(w.shape[2 + axis] for w in weights) for axis in range(x.ndim - 2)]
    padded = []
    for w in weights:
        pad = []
        for k_max, k in zip(reversed(kernel), reversed(w.shape[2:])):  # F.pad: last axis first
            pad += [(k_max - k) // 2] * 2
        padded.append(F.pad(w, pad))
    weight, padding = torch.cat(padded), _same_padding(kernel)
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
                grad_out[:, start:stop], x[:, start:stop], w, [w.shape[0]], [1, 1], _same_padding(w.shape[2:]),
                [1, 1], False, [0, 0], w.shape[0], [False, True, True])
            grads += [grad_w, grad_b]
            start = stop
        return (grad_x, *grads)




def _same_padding(kernel: Sequence[int]) -> List[int]:
    return [(k - 1) // 2 for k in kernel]
