"""The blockwise CPU training path (networks/cpu_training.py, issue 6) computes what the modules compute: outputs,
every gradient and the BatchNorms' running statistics, exactly in float64 and within float32 round-off; and it
declines (touching nothing) wherever its conditions do not hold."""
import copy

import pytest
import torch
from torch import nn

from nnunetv2_lgms.benchmark.speed_paths import disable_speed_paths
from nnunetv2_lgms.networks import cpu_training, lgms_blocks
from nnunetv2_lgms.networks.blocks import ScalarPReLU
from nnunetv2_lgms.networks.cpu_training import pointwise_pair_blockwise
from nnunetv2_lgms.networks.lgms_blocks import FusionConv


def close(a, b, scale, msg=None):
    if a.dtype == torch.float64:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11 * scale, msg=msg)
    else:
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4 * scale, msg=msg)


def magnitude(t: torch.Tensor) -> float:
    return float(t.abs().max()) or 1.0


def make_layers(dim, c_in, c_mid, c_out, dtype, momentum=0.1, track=True):
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d
    layers = nn.ModuleDict({
        "input_norm": norm(c_in, momentum=momentum, track_running_stats=track),
        "first": conv(c_in, c_mid, 1), "act": nn.GELU(), "norm": norm(c_mid, momentum=momentum,
                                                                     track_running_stats=track),
        "second": conv(c_mid, c_out, 1)}).to(dtype)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("input_norm", "norm"):
            bn = layers[name]
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
            if track:
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return layers.train()


def channels_last_input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 2  # mean far from 0: the shifted moments are exercised
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=fmt)


def run(layers, x, grad, fast: bool, with_input_norm: bool):
    x = x.clone().requires_grad_(True)
    if fast:
        out = pointwise_pair_blockwise(x, layers["first"], layers["act"], layers["norm"], layers["second"],
                                       input_norm=layers["input_norm"] if with_input_norm else None,
                                       block_pixels=16)
        assert out is not None
    else:
        h = layers["input_norm"](x) if with_input_norm else x
        out = layers["second"](layers["norm"](layers["act"](layers["first"](h))))
    out.backward(grad)
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_input_norm", [True, False])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 6, 3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("momentum, track", [(0.1, True), (None, True), (0.1, False)],
                         ids=["momentum", "cumulative", "no-running-stats"])
def test_pointwise_pair_blockwise_equals_the_modules(shape, with_input_norm, dtype, momentum, track):
    """Blocks of 16 pixels over 70 or 60 pixels: several full blocks and a partial last one."""
    layers = make_layers(len(shape) - 2, shape[1], 12, 4, dtype, momentum, track)
    ref = copy.deepcopy(layers)
    x = channels_last_input(shape, dtype)
    grad = channels_last_input((shape[0], 4, *shape[2:]), dtype, seed=1)
    for step in range(2):  # the second step checks the running-average factor after one tracked batch
        for m in (*layers.values(), *ref.values()):
            m.zero_grad()
        out, gx = run(layers, x, grad, fast=True, with_input_norm=with_input_norm)
        out_ref, gx_ref = run(ref, x, grad, fast=False, with_input_norm=with_input_norm)
        close(out, out_ref, magnitude(out_ref))
        assert out.movedim(1, -1).is_contiguous()  # channels-last out, as the plain modules give here
        close(gx, gx_ref, magnitude(gx_ref))
        grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        if not with_input_norm:
            assert not any(n.startswith("input_norm") for n in grads)
        scale = max(magnitude(g) for g in grads.values())
        for name, p in layers.named_parameters():
            if name in grads:
                close(p.grad, grads[name], scale, msg=f"step {step}: {name}")
            else:
                assert p.grad is None
        buffers = dict(layers.named_buffers())
        for name, buf in ref.named_buffers():
            if buf.is_floating_point():
                close(buffers[name], buf, magnitude(buf), msg=name)
            else:
                assert torch.equal(buffers[name], buf), name  # num_batches_tracked


def test_pointwise_pair_blockwise_declines_and_touches_nothing():
    layers = make_layers(2, 6, 12, 4, torch.float32)
    x = channels_last_input((2, 6, 5, 7), torch.float32)
    args = lambda ls: (ls["first"], ls["act"], ls["norm"], ls["second"])  # noqa: E731

    def declined(ls, inp=x, **kw):
        before = {n: b.clone() for n, b in ls.named_buffers()}
        if pointwise_pair_blockwise(inp, *args(ls), **kw) is not None:
            return False
        assert all(torch.equal(before[n], b) for n, b in ls.named_buffers())  # not a tracked batch either
        return True

    assert not declined(copy.deepcopy(layers))  # the baseline case applies
    assert declined(layers, x.contiguous())  # not channels-last
    with torch.no_grad():
        assert declined(layers)  # inference: the eval-mode paths of cpu_inference apply there
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert declined(layers)  # the modules' per-op autocast dtypes are what the user asked for
    variants = {
        "eval-mode norm": lambda ls: ls["norm"].eval(),
        "eval-mode input norm": lambda ls: ls["input_norm"].eval(),
        "SiLU": lambda ls: ls.__setitem__("act", nn.SiLU()),
        "InstanceNorm": lambda ls: ls.__setitem__("norm", nn.InstanceNorm2d(12, affine=True).train()),
        "3x3 conv": lambda ls: ls.__setitem__("first", nn.Conv2d(6, 12, 3, padding=1)),
        "no bias": lambda ls: ls.__setitem__("second", nn.Conv2d(12, 4, 1, bias=False)),
        "strided": lambda ls: ls.__setitem__("second", nn.Conv2d(12, 4, 1, stride=2)),
        "grouped": lambda ls: ls.__setitem__("first", nn.Conv2d(6, 12, 1, groups=2)),
        "float64 weights": lambda ls: ls["second"].double(),
    }
    for name, change in variants.items():
        ls = copy.deepcopy(layers)
        change(ls)
        assert declined(ls, input_norm=ls["input_norm"]), name
    assert declined(copy.deepcopy(layers), channels_last_input((1, 6, 1, 1), torch.float32))  # one value per channel


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fusion_conv_training_runs_blockwise_and_equals_the_plain_modules(dtype, monkeypatch):
    torch.manual_seed(0)
    block = FusionConv(nn.Conv2d, 12, 5, nn.BatchNorm2d).to(dtype).train()
    ref = disable_speed_paths(copy.deepcopy(block))
    calls = []
    real = lgms_blocks.pointwise_pair_blockwise
    monkeypatch.setattr(lgms_blocks, "pointwise_pair_blockwise", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = channels_last_input((2, 12, 9, 11), dtype)
    outs, grads = [], []
    for net in (block, ref):
        xi = x.clone().requires_grad_(True)
        out = net(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    assert len(calls) == 1  # the fast module ran the blockwise path (the plain one, switched off, does not ask)
    close(outs[0], outs[1], magnitude(outs[1]))
    scale = max(magnitude(g) for g in grads[1])
    for a, b in zip(grads[0], grads[1]):
        close(a, b, scale)
    for a, b in zip(block.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("slope", [0.25, -0.7])
def test_scalar_prelu_equals_nn_prelu_forward_and_backward(dtype, channels_last, slope):
    """GLIMS's single-slope PReLU with the leaky-ReLU backward and a dot product for the slope: values, input
    gradient and slope gradient of ``nn.PReLU`` (exact values at x = 0 included)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7, 4, dtype=dtype)
    x[0, 0, 0] = 0.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    grad = torch.randn(x.shape, dtype=dtype)
    fast, plain = ScalarPReLU(init=slope).to(dtype), nn.PReLU(init=slope).to(dtype)
    results = []
    for module in (fast, plain):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, module.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-5)
    assert cpu_training.scalar_prelu(x, fast.weight) is not None  # the fast function ran (autograd on, CPU)


def test_scalar_prelu_declines_where_it_does_not_apply():
    x, w = torch.randn(2, 3, 4, 4), torch.tensor([0.25])
    assert cpu_training.scalar_prelu(x, torch.tensor([0.25, 0.1, 0.2])) is None  # per-channel slopes
    assert cpu_training.scalar_prelu(x.half(), w.half()) is None
    with torch.no_grad():
        assert cpu_training.scalar_prelu(x, w) is None  # inference: the in-place paths handle it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_training.scalar_prelu(x, w) is None
