"""Each speed path (issue 6) computes exactly what the plain path computes: forward outputs and every gradient agree,
to float64 precision and, in float32 (other kernels, other summation order), within a tolerance scaled to each
tensor's magnitude. The plain path is the same module with the speed switch off."""
import collections
import copy
from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nnunetv2_lgms.benchmark.speed_paths import disable_speed_paths
from nnunetv2_lgms.flops import count_flops
from nnunetv2_lgms.networks import cpu_inference
from nnunetv2_lgms.networks.blocks import (ConvNormAct, channels_last_format, in_memory_format_of, is_channels_last,
                                           restrict_kernel)
from nnunetv2_lgms.networks.glims import GLIMS
from nnunetv2_lgms.networks.lgms_blocks import FusionConv, LocalMultiscaleBlock, UpConv
from nnunetv2_lgms.networks.lgmsnet import LGMSNet
from nnunetv2_lgms.networks.sparse_attention import MultiHeadSelfAttention, SparseTransformer

DTYPES = [torch.float64, torch.float32]


def close(a, b, scale, msg=""):
    """Round-off is relative to the magnitudes flowing through the network (``scale``): gradients that are zero in
    exact math (a conv bias before BatchNorm) carry round-off of that size, not of their own."""
    if a.dtype == torch.float64:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10 * scale, msg=msg or None)
    else:
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * scale, msg=msg or None)


def magnitude(tensors) -> float:
    return max(float(t.abs().max()) for t in tensors) or 1.0


def plain_copy(net: nn.Module) -> nn.Module:
    return disable_speed_paths(copy.deepcopy(net))


def randomise_norm_statistics(net: nn.Module) -> None:
    """Running statistics and affine parameters far from their initial 0/1, so that folding them is exercised."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def forward_backward(net, x, outputs_of):
    x = x.clone().requires_grad_(True)
    out = outputs_of(net(x))
    # a position-dependent loss, so that a misplaced value changes the gradients
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in out)
    loss.backward()
    return [o.detach() for o in out], x.grad, {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


def assert_same(fast, plain):
    (out_f, gx_f, g_f), (out_p, gx_p, g_p) = fast, plain
    for a, b in zip(out_f, out_p):
        close(a, b, magnitude([b]))
    close(gx_f, gx_p, magnitude([gx_p]))
    assert g_f.keys() == g_p.keys() and len(g_f) > 0
    grad_scale = magnitude(g_p.values())
    for name in g_f:
        close(g_f[name], g_p[name], grad_scale, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("conv_op, shape, channels_last_input", [
    (nn.Conv2d, (2, 16, 20, 24), False),
    (nn.Conv2d, (2, 16, 20, 24), True),
    (nn.Conv3d, (2, 8, 10, 12, 9), False),
])
def test_lms_channels_last_depthwise_equals_plain_path(conv_op, shape, channels_last_input, dtype):
    torch.manual_seed(0)
    norm = nn.BatchNorm2d if conv_op is nn.Conv2d else nn.InstanceNorm3d
    block = LocalMultiscaleBlock(conv_op, shape[1], norm).to(dtype)
    ref = plain_copy(block)
    x = torch.randn(shape, dtype=dtype)
    if channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last)
    fast = forward_backward(block, x, lambda y: [y])
    assert_same(fast, forward_backward(ref, x, lambda y: [y]))
    # the residual sum keeps the input's layout (no mixed-format elementwise ops downstream)
    assert is_channels_last(block(x)) == channels_last_input


@pytest.mark.parametrize("dim, patch, strides", [
    (2, (64, 48), [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]),
    (3, (16, 32, 24), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lgmsnet_speed_paths_equal_plain_network(dim, patch, strides, train, dtype):
    torch.manual_seed(0)
    kernels = [[1, 3, 3]] + [[3, 3, 3]] * 4 if dim == 3 else [[3, 3]] * 5
    net = LGMSNet.from_plan(patch, strides, kernels, 2, 3, deep_supervision=train).to(dtype)
    randomise_norm_statistics(net)  # eval mode: BatchNorms folded into convs
    ref = plain_copy(net)
    for m in net.modules():
        if isinstance(m, MultiHeadSelfAttention):
            m.pad_min_tokens = 1  # these maps give sequences shorter than the threshold; pad the heads anyway
    net.train(train)
    ref.train(train)
    x = torch.randn(2, 2, *patch, dtype=dtype)
    outputs = (lambda y: y) if train else (lambda y: [y])
    fast = forward_backward(net, x, outputs)
    if dtype == torch.float64:
        assert_same(fast, forward_backward(ref, x, outputs))
    else:
        assert_same_up_to_relu_kinks(fast, forward_backward(ref, x, outputs))
    for o in fast[0]:
        assert o.is_contiguous()  # callers (nnU-Net's loss, sliding window) get NC(D)HW tensors


def assert_same_up_to_relu_kinks(fast, plain):
    """float32 network gradients: outputs elementwise, gradients in relative L2 norm. Rounding can move a
    pre-activation that sits at ~0 to the other side of a ReLU; its whole gradient then takes the other branch, and
    the tiny-map BatchNorms of these test networks spread that further. Measured on the 3D case: the fast path's
    input gradient was 1.5e-2 (L2) from the float64 result with one ReLU mask element flipped, the plain path's
    1.1e-5 with none flipped. The float64 cases check the paths elementwise to 1e-9."""
    (out_f, gx_f, g_f), (out_p, gx_p, g_p) = fast, plain
    for a, b in zip(out_f, out_p):
        close(a, b, magnitude([b]))
    assert g_f.keys() == g_p.keys() and len(g_f) > 0
    for name, a, b in [("input", gx_f, gx_p)] + [(n, g_f[n], g_p[n]) for n in g_f]:
        assert float((a - b).norm()) <= 5e-2 * float(b.norm()) + 1e-4 * magnitude(g_p.values()), name


def test_in_memory_format_of_follows_the_reference_layout():
    ref_cl = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    t = torch.randn(2, 4, 5, 6)
    assert is_channels_last(in_memory_format_of(t, ref_cl))
    assert in_memory_format_of(ref_cl, t).is_contiguous()
    torch.testing.assert_close(in_memory_format_of(t, ref_cl), t, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_folding_in_eval_equals_conv_then_norm(dtype):
    torch.manual_seed(0)
    blocks = nn.Sequential(ConvNormAct(nn.Conv2d, 6, 8, 3, nn.BatchNorm2d, nn.SiLU, bias=True),
                           ConvNormAct(nn.Conv2d, 8, 8, 1, nn.BatchNorm2d, nn.ReLU),
                           FusionConv(nn.Conv2d, 8, 4, nn.BatchNorm2d)).to(dtype)
    randomise_norm_statistics(blocks)
    ref = plain_copy(blocks)
    blocks.eval()
    ref.eval()
    x = torch.randn(2, 6, 12, 10, dtype=dtype)
    assert_same(forward_backward(blocks, x, lambda y: [y]), forward_backward(ref, x, lambda y: [y]))
    # training mode does not fold: batch statistics, and the running statistics are updated as usual
    blocks.train()
    before = blocks[0][1].running_mean.clone()
    blocks(x)
    assert not torch.equal(before, blocks[0][1].running_mean)


def _derived(net):
    return [m.__dict__["_derived_for_inference"] for m in net.modules() if "_derived_for_inference" in m.__dict__]


def test_folded_weights_are_reused_in_inference_until_a_weight_or_statistic_changes():
    """Eval-mode folding runs once and is reused (fewer kernel launches on CUDA); every way a weight or a BatchNorm
    statistic changes (optimiser step, training-mode statistics, load_state_dict, in-place edit, dtype) refreshes it."""
    torch.manual_seed(0)
    net = LGMSNet.from_plan((32, 32), [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]], [[3, 3]] * 5, 3, 2,
                            deep_supervision=False)
    randomise_norm_statistics(net)
    x = torch.randn(2, 3, 32, 32)

    def assert_equals_plain_network():
        ref = plain_copy(net).eval()
        net.eval()
        with torch.no_grad():
            out, expected = net(x), ref(x)
        close(out, expected, magnitude([expected]))

    assert_equals_plain_network()
    first = _derived(net)
    assert len(first) > 10  # every folding ConvNormAct and FusionConv keeps its folded weights
    with torch.no_grad():
        net(x)
    assert all(a is b for a, b in zip(first, _derived(net)))  # reused, not re-derived

    net.train()  # training: batch statistics update the running ones, then an SGD step changes the weights
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(x).square().mean().backward()
    opt.step()
    assert_equals_plain_network()
    assert not any(a is b for a, b in zip(first, _derived(net)))

    other = LGMSNet.from_plan((32, 32), [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]], [[3, 3]] * 5, 3, 2,
                              deep_supervision=False)
    randomise_norm_statistics(other)
    net.load_state_dict(other.state_dict())
    assert_equals_plain_network()

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.mul_(3)
        next(iter(net.parameters())).mul_(-1)
    assert_equals_plain_network()

    net.double()
    x = x.double()
    assert_equals_plain_network()
    # (UpConv's sub-pixel path is float32-only: in float64 its ConvNormAct folds and its own cache is not consulted)
    folded = [t for m in net.modules() if "_derived_for_inference" in m.__dict__ and not isinstance(m, UpConv)
              for t in torch.utils._pytree.tree_leaves(m.__dict__["_derived_for_inference"][1])]
    assert folded and all(t.dtype == torch.float64 for t in folded)


def test_folded_weights_under_inference_mode():
    """nnU-Net's predictor runs under torch.inference_mode: reuse works there, and weights that are themselves
    inference tensors (no version counter) are folded on every call instead."""
    plan = ((32, 32), [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]], [[3, 3]] * 5, 3, 2)
    torch.manual_seed(0)
    net = LGMSNet.from_plan(*plan, deep_supervision=False)
    randomise_norm_statistics(net)
    net.eval()
    ref = plain_copy(net).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        first, second, expected = net(x), net(x), ref(x)
    close(first, expected, magnitude([expected]))
    assert torch.equal(first, second) and _derived(net)
    with torch.inference_mode():
        inference_net = LGMSNet.from_plan(*plan, deep_supervision=False).eval()
        inference_net.load_state_dict(net.state_dict())
        out = inference_net(x)
    close(out, expected, magnitude([expected]))
    assert not _derived(inference_net)


# ---------------------------------------------------------------- CPU inference paths (networks/cpu_inference.py)

needs_onednn = pytest.mark.skipif(cpu_inference._onednn_conv_pointwise() is None,
                                  reason="this PyTorch build has no oneDNN fused convolution")


class OpCounter(TorchDispatchMode):
    """Counts the ATen/oneDNN ops dispatched inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))


def run_fast_and_plain(net, ref, x, grad_off):
    """``net`` (speed paths on) and ``ref`` (off) on ``x`` without autograd: their outputs and the ops each
    dispatched. The in-place paths may only overwrite the network's own intermediates: ``x`` comes back untouched."""
    x_before = x.clone()
    fast_ops, plain_ops = OpCounter(), OpCounter()
    with grad_off():
        with plain_ops:
            expected = ref(x)
        with fast_ops:
            out = net(x)
    assert torch.equal(x, x_before)
    return out, expected, fast_ops.counts, plain_ops.counts


ACTIVATIONS = [nn.ReLU(), nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.LeakyReLU(0.2)]


@needs_onednn
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: repr(a))
@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 8, 3, padding=1, bias=True),
    nn.Conv2d(6, 4, 3, padding=2, dilation=2, stride=2, groups=2, bias=False),
    nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), bias=True),
], ids=["2d", "2d-strided-dilated-grouped", "3d-anisotropic"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_act_fused_equals_conv_then_activation(conv, act, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, *[9, 10, 7][:conv.weight.ndim - 2])
    if channels_last:
        x = x.contiguous(memory_format=channels_last_format(x.ndim - 2))
    weight, bias = conv.weight * 1.5, None if conv.bias is None else conv.bias - 0.5
    with torch.no_grad():
        expected = act(conv._conv_forward(x, weight, bias))
        fused = cpu_inference.conv_act_fused(conv, x, weight, bias, act)
    assert fused is not None
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_narrow_3d_conv_at_batch_1_runs_in_onednn():
    """nnU-Net predicts 3D at batch 1. PyTorch's dispatch sends a conv with batch x C_in x D x H below 20480 to its
    slow im2col kernel; ConvNormAct's eval path calls oneDNN directly (no post-op when a norm follows)."""
    torch.manual_seed(0)
    block = ConvNormAct(nn.Conv3d, 4, 16, 3, nn.InstanceNorm3d, nn.SiLU, norm_kwargs={"affine": True}).eval()
    ref = plain_copy(block).eval()
    x = torch.randn(1, 4, 12, 40, 20)  # 1 x 4 x 12 x 40 = 1920: PyTorch's own dispatch picks slow_conv3d
    kernels = {}
    with torch.no_grad():
        for name, net in (("plain", ref), ("fast", block)):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                kernels[name] = net(x)
            kernels[name + " ops"] = {e.key for e in prof.key_averages()}
    torch.testing.assert_close(kernels["fast"], kernels["plain"], rtol=1e-4, atol=1e-4)
    assert "aten::slow_conv3d_forward" in kernels["plain ops"]
    assert "aten::slow_conv3d_forward" not in kernels["fast ops"]
    assert "mkldnn::_convolution_pointwise" in kernels["fast ops"]


@needs_onednn
def test_conv_act_fused_declines_where_it_does_not_apply():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert cpu_inference.conv_act_fused(conv, x, conv.weight, conv.bias, nn.ReLU()) is not None
        assert cpu_inference.conv_act_fused(conv, x, conv.weight, conv.bias, nn.PReLU()) is None  # no post-op
        assert cpu_inference.conv_act_fused(conv, x.double(), conv.weight.double(), conv.bias.double(),
                                            nn.ReLU()) is None
        same = nn.Conv2d(4, 4, 3, padding="same")
        assert cpu_inference.conv_act_fused(same, x, same.weight, same.bias, nn.ReLU()) is None
        transposed = nn.ConvTranspose2d(4, 4, 2, stride=2)
        assert cpu_inference.conv_act_fused(transposed, x, transposed.weight, transposed.bias, nn.ReLU()) is None
    assert cpu_inference.conv_act_fused(conv, x, conv.weight, conv.bias, nn.ReLU()) is None  # autograd on


@pytest.mark.parametrize("shape, fmt", [((2, 6, 5, 7), torch.channels_last), ((1, 6, 3, 4, 5), torch.channels_last_3d)])
@pytest.mark.parametrize("with_affine", [False, True])
def test_pointwise_convs_blockwise_equal_layer_by_layer(shape, fmt, with_affine):
    torch.manual_seed(0)
    dim = len(shape) - 2
    conv_op = nn.Conv2d if dim == 2 else nn.Conv3d
    convs = [conv_op(6, 12, 1), conv_op(12, 5, 1, bias=False), conv_op(5, 3, 1)]
    acts = [nn.GELU(), nn.SiLU(), nn.LeakyReLU(0.1)]
    affine = (torch.randn(3), torch.randn(3)) if with_affine else None
    x = torch.randn(shape).contiguous(memory_format=fmt)
    with torch.no_grad():
        expected = x
        for conv, act in zip(convs, acts):
            expected = act(conv(expected))
        if affine:
            expected = expected * affine[0].view(-1, *[1] * dim) + affine[1].view(-1, *[1] * dim)
        layers = [(c.weight, c.bias, a) for c, a in zip(convs, acts)]
        # 7 pixels per block: the last block is partial (70 and 60 pixels)
        out = cpu_inference.pointwise_convs_blockwise(x, layers, affine, block_pixels=7)
        assert out is not None and out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # declined: contiguous NC(D)HW input, a kernel larger than 1, an activation without an in-place form
        assert cpu_inference.pointwise_convs_blockwise(x.contiguous(), layers, affine) is None
        wide = conv_op(6, 12, 3)
        assert cpu_inference.pointwise_convs_blockwise(x, [(wide.weight, wide.bias, nn.ReLU())]) is None
        assert cpu_inference.pointwise_convs_blockwise(x, [(convs[0].weight, None, nn.PReLU())]) is None
        # the input as two maps whose channels concatenate to it: one GEMM per part, no concatenation
        parts = [x[:, :2].contiguous(memory_format=fmt), x[:, 2:].contiguous(memory_format=fmt)]
        out_parts = cpu_inference.pointwise_convs_blockwise(parts, layers, affine, block_pixels=7)
        torch.testing.assert_close(out_parts, expected, rtol=1e-5, atol=1e-5)
    assert cpu_inference.pointwise_convs_blockwise(x, layers, affine) is None  # autograd on


@pytest.mark.parametrize("dim, patch, strides", [
    (2, (64, 48), [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]),
    (3, (16, 32, 24), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("in_channels", [1, 2])
def test_lgmsnet_inference_without_autograd_equals_plain_network(dim, patch, strides, dtype, grad_off, in_channels):
    """nnU-Net predicts without autograd: there the fused and in-place paths run, and give the plain result. A
    one-channel image (most CT/MRI, grayscale 2D) is channels-last and contiguous at once, so the network must switch
    format after its stem."""
    torch.manual_seed(0)
    kernels = [[1, 3, 3]] + [[3, 3, 3]] * 4 if dim == 3 else [[3, 3]] * 5
    net = LGMSNet.from_plan(patch, strides, kernels, in_channels, 3, deep_supervision=False).to(dtype)
    randomise_norm_statistics(net)
    net.eval()
    ref = plain_copy(net).eval()
    x = torch.randn(2, in_channels, *patch, dtype=dtype)
    out, expected, counts, _ = run_fast_and_plain(net, ref, x, grad_off)
    assert out.is_contiguous()
    close(out, expected, magnitude([expected]))
    if dtype == torch.float32 and cpu_inference._onednn_conv_pointwise() is not None:
        # at least every FusionConv conv with its GELU (3 x 3; 2D also fuses the BatchNorm-folded ConvNormActs)
        assert counts["mkldnn::_convolution_pointwise"] >= (20 if dim == 2 else 9)
        # channels-last: FusionConv's 1x1 convs run blockwise, as GEMMs into the output (2D: both, folded; 3D: the
        # expansion, its InstanceNorms in place), and the decoder's [skip, up] reach them as two parts (one GEMM
        # each) instead of a concatenation
        assert counts["aten::addmm.out"] >= (2 * 3 if dim == 2 else 3)
        assert counts["aten::addmm_"] >= 3
    assert counts["aten::gelu_"] >= 3  # the LMS blocks' in-place GELU


@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
def test_sparse_transformer_layer_in_place_inference_equals_plain(grad_off):
    """Without autograd the Transformer layer's two residual sums and its MLP's SiLU overwrite the layer's own fresh
    tensors: bit for bit the plain result (the sums commute), its input untouched; with autograd the plain path."""
    from nnunetv2_lgms.networks.sparse_attention import SparseTransformerLayer
    torch.manual_seed(0)
    layer = SparseTransformerLayer(48, 96)
    x = torch.randn(3, 70, 48)
    out, expected, fast_ops, plain_ops = run_fast_and_plain(layer, plain_copy(layer), x, grad_off)
    assert torch.equal(out, expected)
    assert (fast_ops["aten::silu_"], fast_ops["aten::add_.Tensor"]) == (1, 2)
    assert (plain_ops["aten::silu_"], plain_ops["aten::add_.Tensor"]) == (0, 0)
    trained = layer(x.requires_grad_())
    trained.sum().backward()
    assert torch.equal(trained.detach(), expected) and x.grad is not None


@pytest.mark.parametrize("size", [(3, 3), (5, 7), (8, 6), (16, 16)])
def test_upconv_subpixel_inference_equals_upsample_then_conv(size):
    """2D CPU inference: bilinear x2 upsampling + 3x3 conv + folded BatchNorm + ReLU as one conv with four output
    phases of the low-resolution map, border rows and columns recomputed from strips; equal to the plain path (sizes
    down to 3, where the strips overlap), against float64, and it runs without the full-size upsampling."""
    from nnunetv2_lgms.networks.lgms_blocks import UpConv, subpixel_kernel
    torch.manual_seed(0)
    block = UpConv(nn.Conv2d, 6, 5, nn.BatchNorm2d)
    randomise_norm_statistics(block)
    block.eval()
    x = torch.randn(2, 6, *size).contiguous(memory_format=torch.channels_last)
    target = tuple(2 * s for s in size)
    exact = plain_copy(block).double()(x.double(), target)
    sizes = []
    real = torch.nn.functional.interpolate
    with torch.no_grad():
        with mock.patch("torch.nn.functional.interpolate",
                        lambda t, *a, **k: sizes.append(tuple(k["size"])) or real(t, *a, **k)):
            out = block(x, target)
        plain = plain_copy(block)(x, target)
    assert out.shape == (2, 5, *target) and out.is_contiguous(memory_format=torch.channels_last)
    h, w = target
    assert sizes == [(4, w), (4, w), (h, 4), (h, 4)]  # only the 2-wide strips were upsampled
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    # the phase kernels: a delta kernel (identity conv) gives the bilinear weights themselves
    delta = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    delta[0, 0, 1, 1] = 1
    phases = subpixel_kernel(delta)[:, 0]
    assert torch.equal(phases[0], torch.outer(torch.tensor([.25, .75, 0.], dtype=torch.float64),
                                              torch.tensor([.25, .75, 0.], dtype=torch.float64)))
    assert torch.equal(phases[3], torch.outer(torch.tensor([0., .75, .25], dtype=torch.float64),
                                              torch.tensor([0., .75, .25], dtype=torch.float64)))


def test_upconv_subpixel_declines_where_it_does_not_apply():
    from nnunetv2_lgms.networks.lgms_blocks import UpConv
    block = UpConv(nn.Conv2d, 4, 4, nn.BatchNorm2d).eval()
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert block._subpixel_forward(x, (12, 12)) is not None
        assert block._subpixel_forward(x, (6, 12)) is None  # a stride of 1 on one axis
        assert block._subpixel_forward(x[:, :, :2], (4, 12)) is None  # too small for the border strips
        assert block._subpixel_forward(x.double(), (12, 12)) is None
        assert block._subpixel_forward(x.contiguous(), (12, 12)) is None  # not channels-last
    assert block._subpixel_forward(x, (12, 12)) is None  # autograd on
    with torch.no_grad():
        assert block.train()._subpixel_forward(x, (12, 12)) is None  # batch statistics: nothing to fold
        no_norm = UpConv(nn.Conv2d, 4, 4, None).eval()
        assert no_norm._subpixel_forward(x, (12, 12)) is None and no_norm(x, (12, 12)).shape == (1, 4, 12, 12)


@pytest.fixture
def sdpa_head_dims(monkeypatch):
    """The head width of every ``F.scaled_dot_product_attention`` call, in order."""
    head_dims = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: head_dims.append(q.shape[-1])
                        or sdpa(q, *a, **kw))
    return head_dims


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_on_zero_padded_heads_equals_the_plain_attention(dtype, sdpa_head_dims):
    """The padded-heads path against the same module with it off, forward and every gradient; and the head width
    that actually reaches F.scaled_dot_product_attention."""
    head_dims = sdpa_head_dims
    torch.manual_seed(0)
    fast = MultiHeadSelfAttention(dim=24, heads=4, head_dim=8).to(dtype)
    plain = copy.deepcopy(fast)
    plain.pad_head_dim = False
    x = torch.randn(3, 130, 24, dtype=dtype)  # 130 >= pad_min_tokens
    grad_out = torch.randn(3, 130, 24, dtype=dtype)
    results = []
    for module in (fast, plain):
        x_grad = x.clone().requires_grad_()
        out = module(x_grad)
        results.append((out.detach(), torch.autograd.grad(out, [x_grad, *module.parameters()], grad_out)))
    assert head_dims == [16, 8]
    (out_f, grads_f), (out_p, grads_p) = results
    close(out_f, out_p, magnitude([out_p]))
    for a, b in zip(grads_f, grads_p):
        close(a, b, magnitude([b]))


def test_attention_pads_heads_only_where_it_was_measured_faster(sdpa_head_dims):
    head_dims = sdpa_head_dims
    narrow, wide = MultiHeadSelfAttention(24, 4, 8), MultiHeadSelfAttention(24, 2, 16)
    with torch.no_grad():
        narrow(torch.randn(2, 128, 24))
        narrow(torch.randn(2, 127, 24))  # short sequences: the copy cost more than it saved
        wide(torch.randn(2, 200, 24))  # already 16 wide: padding further was slower
        with torch.autocast("cpu", dtype=torch.bfloat16):  # not measured
            narrow(torch.randn(2, 200, 24))
    assert head_dims == [16, 8, 16, 8]
    head_dims.clear()
    count_flops(narrow, (2, 200, 24))  # the architecture's FLOPs, not the padded ones
    assert head_dims == [8]


def test_sparse_transformer_keeps_channels_last():
    """The GMS block splits a channels-last map by channels; the Transformer's output must come back channels-last,
    or every later layer (the whole 2D decoder) would run in the slower contiguous layout."""
    net = LGMSNet.from_plan((32, 32), [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]], [[3, 3]] * 5, 3, 2,
                            deep_supervision=False).eval()
    formats = []
    hooks = [m.register_forward_hook(lambda m, i, o: formats.append(is_channels_last(o)))
             for m in net.modules() if isinstance(m, (SparseTransformer, UpConv))]
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(formats) == 4 + 4 and all(formats)


@pytest.mark.parametrize("channels_last", [True, False])
def test_fusion_conv_on_parts_equals_fusion_conv_on_the_concatenation(channels_last):
    torch.manual_seed(0)
    block = FusionConv(nn.Conv2d, 12, 5, nn.BatchNorm2d)
    randomise_norm_statistics(block)
    block.eval()
    ref = plain_copy(block).eval()
    skip, up = torch.randn(2, 6, 9, 11), torch.randn(2, 6, 9, 11)
    if channels_last:
        skip, up = (t.contiguous(memory_format=torch.channels_last) for t in (skip, up))
    counter = OpCounter()
    with torch.no_grad():
        expected = ref(torch.cat([skip, up], dim=1))
        with counter:
            out = block.forward_parts([skip, up])
    close(out, expected, magnitude([expected]))
    assert ("aten::cat" not in counter.counts) == channels_last  # NCHW parts: the plain path on the concatenation
    block.train()
    torch.testing.assert_close(block.forward_parts([skip, up]), block(torch.cat([skip, up], dim=1)))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fusion_conv_3d_instance_norm_on_parts_equals_the_concatenation(channels_last, affine):
    """LGMSNet-3D's decoder fusion in CPU inference: per-part dense convs, each part normalised with its own
    channels' statistics, the expansion as one GEMM per part; no concatenation and no InstanceNorm kernel. Compared
    with the float64 modules on the concatenation."""
    torch.manual_seed(0)
    block = FusionConv(nn.Conv3d, 12, 5, nn.InstanceNorm3d, {"eps": 1e-5, "affine": affine})
    for m in block.modules():
        if isinstance(m, nn.InstanceNorm3d) and affine:
            _norm_with_random_affine(m)
    block.eval()
    skip, up = torch.randn(2, 6, 5, 9, 11), torch.randn(2, 6, 5, 9, 11) * 3 + 1
    if channels_last:
        skip, up = (t.contiguous(memory_format=torch.channels_last_3d) for t in (skip, up))
    counter = OpCounter()
    with torch.no_grad():
        exact = disable_speed_paths(copy.deepcopy(block)).double()(torch.cat([skip, up], dim=1).double())
        with counter:
            out = block.forward_parts([skip, up])
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5 * magnitude([exact]))
    if channels_last:
        assert "aten::cat" not in counter.counts and "aten::native_batch_norm" not in counter.counts
    else:  # NCDHW parts: the plain path on the concatenation
        assert counter.counts["aten::cat"] == 1


@pytest.mark.parametrize("plan_kernel", [(3, 3), (1, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lms_merged_depthwise_equals_the_four_convs(plan_kernel, dtype):
    """One depthwise conv with zero-padded kernels (2D, CPU) against the four convs on channel slices, forward and
    backward; a plan kernel of 1 on an axis gives (1, k) kernels, padded along the other axis only."""
    torch.manual_seed(0)
    block = LocalMultiscaleBlock(nn.Conv2d, 16, nn.BatchNorm2d, plan_kernel=plan_kernel).to(dtype)
    ref = plain_copy(block)
    assert block.merged_depthwise and not ref.merged_depthwise
    x = torch.randn(2, 16, 11, 13, dtype=dtype).contiguous(memory_format=torch.channels_last)
    counter = OpCounter()
    with counter:
        fast = forward_backward(block, x, lambda y: [y])
    assert_same(fast, forward_backward(ref, x, lambda y: [y]))
    # forward: the merged depthwise conv, reduce, expand (the plain path: 6); backward: the input gradient of the
    # merged conv as one more convolution, its weight gradients per group, and reduce's and expand's backward
    assert counter.counts["aten::convolution"] == 3 + 1
    assert counter.counts["aten::convolution_backward"] == 4 + 2
    with torch.no_grad(), OpCounter() as no_grad_counter:
        block(x)
    assert no_grad_counter.counts["aten::convolution"] == 3
    assert block.depthwise[3].weight.grad.shape == (4, 1, *restrict_kernel(9, plan_kernel))


def _norm_with_random_affine(norm: nn.Module) -> nn.Module:
    if getattr(norm, "weight", None) is not None:
        g = torch.Generator().manual_seed(3)
        norm.weight.data.copy_(torch.randn(norm.weight.shape, generator=g))
        norm.bias.data.copy_(torch.randn(norm.bias.shape, generator=g))
    return norm


@pytest.mark.parametrize("norm", [
    nn.InstanceNorm3d(12), nn.InstanceNorm3d(12, affine=True), nn.GroupNorm(12, 12), nn.GroupNorm(4, 12),
    nn.GroupNorm(1, 12),
], ids=["IN", "IN-affine", "GN-per-channel", "GN-4", "GN-1"])
@pytest.mark.parametrize("act", [None, nn.PReLU(init=-0.3), nn.SiLU(), nn.GELU(), nn.ReLU()],
                         ids=["none", "prelu", "silu", "gelu", "relu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_per_sample_norm_act_in_place_equals_the_modules(norm, act, channels_last):
    """GLIMS's and LGMSNet-3D's InstanceNorm/GroupNorm + activation, computed in place on CPU without autograd: the
    float64 result of the modules within float32 round-off (blocks of 100 pixels, so the last one is partial; channel
    offsets of 10 standard deviations, so a one-pass variance would lose digits)."""
    torch.manual_seed(0)
    norm = _norm_with_random_affine(norm)
    x = torch.randn(3, 12, 7, 10, 9) * 3 + torch.randn(1, 12, 1, 1, 1) * 30
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = copy.deepcopy(norm).double()(x.double())
        if act is not None:
            expected = copy.deepcopy(act).double()(expected)
        y = x.clone(memory_format=torch.preserve_format)
        out = cpu_inference.per_sample_norm_act_(y, norm, act, block_pixels=100)
    assert out is y and out.stride() == x.stride()  # in place, layout kept
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5 * magnitude([expected]))


def test_per_sample_norm_act_declines_where_it_does_not_apply():
    x = torch.randn(2, 8, 5, 6, 4)
    before = x.clone()
    norm = nn.InstanceNorm3d(8)
    with torch.no_grad():
        assert cpu_inference.per_sample_norm_act_(x.double(), norm) is None  # float64
        assert cpu_inference.per_sample_norm_act_(x, nn.InstanceNorm3d(8, track_running_stats=True)) is None
        assert cpu_inference.per_sample_norm_act_(x, nn.BatchNorm3d(8)) is None  # folded elsewhere
        assert cpu_inference.per_sample_norm_act_(x, norm, nn.PReLU(8)) is None  # per-channel slope
        assert cpu_inference.per_sample_norm_act_(x, norm, nn.Tanh()) is None
        assert cpu_inference.per_sample_norm_act_(x[:, :, ::2], norm) is None  # neither layout
        # a channel slice: only for per-channel statistics, and the affine slice must fit
        assert cpu_inference.per_sample_norm_act_(x, nn.GroupNorm(4, 16), channels=slice(0, 8)) is None
        assert cpu_inference.per_sample_norm_act_(x, nn.InstanceNorm3d(16, affine=True), channels=slice(0, 4)) is None
    assert cpu_inference.per_sample_norm_act_(x, norm) is None  # autograd on
    assert torch.equal(x, before)
    # a PReLU's slope is read as a number only on CPU (on a GPU that read waits for the device)
    assert cpu_inference.has_in_place_form(nn.PReLU(), x)
    assert not cpu_inference.has_in_place_form(nn.PReLU(), torch.empty(1, device="meta"))
    assert not cpu_inference.has_in_place_form(nn.PReLU(8), x)


@pytest.mark.parametrize("dim, patch, strides", [
    (2, (64, 48), [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]),
    (3, (16, 32, 48), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
def test_glims_inference_without_autograd_equals_plain_network(dim, patch, strides, dtype, grad_off):
    """GLIMS's CPU inference paths (DACB channels-last with norms in place and no concatenation, in-place norms after
    the strided convs, no [up, skip] concatenation in the decoder) give the plain result, leave the input alone and
    return contiguous logits; in float32 no InstanceNorm/GroupNorm kernel runs at all."""
    torch.manual_seed(0)
    kernels = [[1, 3, 3]] + [[3, 3, 3]] * 4 if dim == 3 else [[3, 3]] * 5
    net = GLIMS.from_plan(patch, strides, kernels, 2, 3, deep_supervision=True, feature_size=12).to(dtype).eval()
    ref = plain_copy(net).eval()
    x = torch.randn(2, 2, *patch, dtype=dtype)
    out, expected, counts, plain_counts = run_fast_and_plain(net, ref, x, grad_off)
    assert len(out) == len(expected) == 5 and all(o.is_contiguous() for o in out)
    if dtype == torch.float64:
        for o, e in zip(out, expected):
            close(o, e, magnitude([e]))
    else:  # GLIMS's chained InstanceNorms amplify round-off: the plain float32 path lies up to ~1.6e-4 x the logits'
        # magnitude from the float64 network; the in-place norms (two-pass variances) lie closer
        with grad_off():
            exact = copy.deepcopy(ref).double()(x.double())
        for o, e in zip(out, exact):
            torch.testing.assert_close(o.double(), e, rtol=0, atol=1e-4 * magnitude([e]))
        assert counts["aten::native_group_norm"] == 0 and counts["aten::native_batch_norm"] == 0
        # the DACBs' branch concatenations (12 DACBs) and the 4 decoder concatenations are gone
        assert counts["aten::cat"] < plain_counts["aten::cat"] - 12


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_glims_training_equals_plain_network(deep_supervision):
    """With autograd the inference paths step aside; the PReLUs' faster backward, the depthwise convs' input
    gradient as a forward conv and the 1x1 convs and heads as GEMMs give the same outputs and gradients."""
    torch.manual_seed(0)
    net = GLIMS.from_plan((16, 32, 48), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 5,
                          1, 2, deep_supervision=deep_supervision, feature_size=12).double().train()
    ref = plain_copy(net)
    x = torch.randn(2, 1, 16, 32, 48, dtype=torch.float64)
    outputs_of = (lambda o: o) if deep_supervision else (lambda o: [o])
    assert_same(forward_backward(net, x, outputs_of), forward_backward(ref, x, outputs_of))
