"""The CPU training kernels (acceleration/cpu_kernels.py) and the accelerated modules that run them
(acceleration/cpu_training.py, setting ``cpu_training``) compute what the reference modules compute: outputs,
every gradient and the BatchNorms' running statistics, exactly in float64 and within float32 round-off; and the
kernels decline (touching nothing) wherever their conditions do not hold.

"fast" is the accelerated copy of a reference module (``accelerate(copy.deepcopy(reference))``), "plain" the
reference module itself (nnunetv2_lgms/networks)."""
import copy

import pytest
import torch
from torch import nn

from nnunetv2_lgms.acceleration import SETTINGS, accelerate, cpu_kernels, cpu_training
from nnunetv2_lgms.acceleration.cpu_kernels import pointwise_pair_blockwise
from nnunetv2_lgms.networks import lgms_blocks
from nnunetv2_lgms.networks.lgms_blocks import FusionConv

ALL_SETTINGS = tuple(SETTINGS)  # explicit, so that nnUNet_lgms_acceleration in the environment cannot switch it off


def accelerated(module: nn.Module) -> nn.Module:
    """The accelerated copy of a reference module (every setting, as the trainers build it); ``module`` untouched."""
    fast, report = accelerate(copy.deepcopy(module), ALL_SETTINGS)
    assert report.swapped, "nothing accelerated"
    return fast


def close(a, b, scale, msg=None):
    if a.dtype == torch.float64:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11 * scale, msg=msg)
    else:
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4 * scale, msg=msg)


def conv_results_fast_and_plain(conv, x, fast_fn):
    """[output, input gradient, parameter gradients] of ``fast_fn(conv, x)`` (which must apply) and of ``conv(x)``,
    under a position-dependent loss."""
    results = []
    for fast in (True, False):
        xi = x.clone().requires_grad_(True)
        conv.zero_grad()
        y = fast_fn(conv, xi) if fast else conv(xi)
        assert y is not None
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=x.dtype).view_as(y))
        results.append([y.detach(), xi.grad] + [p.grad.clone() for p in conv.parameters()])
    return results


def magnitude(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) or 1.0


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_input_norm", [True, False])
def test_pointwise_pair_blockwise_on_parts_equals_the_modules_on_the_concatenation(dtype, with_input_norm):
    """Input given as two parts (4 + 2 channels): values, both parts' gradients, parameter gradients and running
    statistics of the modules on ``torch.cat(parts, 1)``."""
    layers = make_layers(2, 6, 12, 4, dtype)
    ref = copy.deepcopy(layers)
    x = channels_last_input((2, 6, 5, 7), dtype)
    grad = channels_last_input((2, 4, 5, 7), dtype, seed=1)
    parts = [x[:, :4].contiguous(memory_format=torch.channels_last).requires_grad_(True),
             x[:, 4:].contiguous(memory_format=torch.channels_last).requires_grad_(True)]
    out = pointwise_pair_blockwise(parts, layers["first"], layers["act"], layers["norm"], layers["second"],
                                   input_norm=layers["input_norm"] if with_input_norm else None, block_pixels=16)
    assert out is not None
    out.backward(grad)
    out_ref, gx_ref = run(ref, x, grad, fast=False, with_input_norm=with_input_norm)
    close(out.detach(), out_ref, magnitude(out_ref))
    close(torch.cat([p.grad for p in parts], dim=1), gx_ref, magnitude(gx_ref))
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    scale = max(magnitude(g) for g in grads.values())
    for name, p in layers.named_parameters():
        if name in grads:
            close(p.grad, grads[name], scale, msg=name)
    for (name, a), b in zip(layers.named_buffers(), ref.buffers()):
        if b.is_floating_point():
            close(a, b, magnitude(b), msg=name)
    # parts that do not add up to the conv's input, or differ in size, are declined
    assert pointwise_pair_blockwise(parts[:1], layers["first"], layers["act"], layers["norm"], layers["second"]) is None
    assert pointwise_pair_blockwise([parts[0], parts[1][:, :, :4]], layers["first"], layers["act"], layers["norm"],
                                    layers["second"]) is None


def test_pointwise_pair_blockwise_backward_keeps_what_it_saved():
    """The stored GELU output is read, not overwritten, by the backward: a second backward of the retained graph
    gives the same gradients again (they accumulate to twice the first)."""
    layers = make_layers(2, 6, 12, 4, torch.float64)
    x = channels_last_input((2, 6, 5, 7), torch.float64).requires_grad_(True)
    grad = channels_last_input((2, 4, 5, 7), torch.float64, seed=1)
    out = pointwise_pair_blockwise(x, layers["first"], layers["act"], layers["norm"], layers["second"],
                                   input_norm=layers["input_norm"], block_pixels=16)
    out.backward(grad, retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in layers.parameters()]
    out.backward(grad)
    for g, again in zip(first, [x.grad] + [p.grad for p in layers.parameters()]):
        torch.testing.assert_close(again, 2 * g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fusion_conv_training_on_parts_equals_the_plain_module_on_the_concatenation(dtype, monkeypatch):
    """LGMSNet's decoder hands ``[skip, up]`` as parts: in CPU training one dense conv per part and the blockwise
    stack on the two parts (no concatenation), with the values, gradients and running statistics of the plain
    module on the concatenation (the reference module, which only ever sees the concatenation)."""
    torch.manual_seed(0)
    ref = FusionConv(nn.Conv2d, 12, 6, nn.BatchNorm2d).to(dtype).train()
    block = accelerated(ref)
    assert isinstance(block, cpu_training.FusionConv) and type(ref) is FusionConv
    seen = []
    real = cpu_training.pointwise_pair_blockwise
    monkeypatch.setattr(cpu_training, "pointwise_pair_blockwise",
                        lambda x, *a, **k: seen.append([p.shape[1] for p in x]) or real(x, *a, **k))
    skip, up = channels_last_input((2, 6, 9, 11), dtype), channels_last_input((2, 6, 9, 11), dtype, seed=2)
    results = []
    for module in (block, ref):
        s, u = skip.clone().requires_grad_(True), up.clone().requires_grad_(True)
        out = module.forward_parts([s, u]) if module is block else module(torch.cat([s, u], dim=1))
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        results.append([out.detach(), s.grad, u.grad] + [p.grad for p in module.parameters()])
    assert seen == [[6, 6]]  # the fast module's stack got the two activated parts; the reference never asks
    scale = max(magnitude(g) for g in results[1])
    for a, b in zip(*results):
        close(a, b, scale)
    for a, b in zip(block.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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
        assert declined(layers)  # inference: a training kernel only
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
    ref = FusionConv(nn.Conv2d, 12, 5, nn.BatchNorm2d).to(dtype).train()
    block = accelerated(ref)
    calls = []
    real = cpu_training.pointwise_pair_blockwise
    monkeypatch.setattr(cpu_training, "pointwise_pair_blockwise", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = channels_last_input((2, 12, 9, 11), dtype)
    outs, grads = [], []
    for net in (block, ref):
        xi = x.clone().requires_grad_(True)
        out = net(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    assert len(calls) == 1  # the accelerated module ran the blockwise path (the reference does not ask)
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
    results = []
    for fast in (True, False):
        module = nn.PReLU(init=slope).to(dtype)
        xi = x.clone().requires_grad_(True)
        y = cpu_kernels.scalar_prelu(xi, module.weight) if fast else module(xi)
        assert y is not None  # the fast function ran (autograd on, CPU)
        y.backward(grad)
        results.append((y.detach(), xi.grad, module.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("slope", [0.25, -0.7])
@pytest.mark.parametrize("norm", ["group", "instance"])
def test_in_place_scalar_prelu_after_a_norm_equals_nn_prelu(dtype, slope, norm):
    """The accelerated modules' PReLU after a norm (``prelu_after_norm``, as GLIMS's accelerated blocks use it, after
    GroupNorm or the accelerated InstanceNorm3d): the norm's output is overwritten for a positive slope (out of place
    for a negative one), and values and all gradients (input, slope, norm affine) equal ``nn.PReLU`` after the
    reference norm."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7, 4, dtype=dtype) * 2 + 0.3
    grad = torch.randn(x.shape, dtype=dtype)

    def make_norm(fast):
        if norm == "group":
            return nn.GroupNorm(5, 5)
        return (cpu_training.InstanceNorm3d if fast else nn.InstanceNorm3d)(5, affine=True)

    results = []
    for fast in (True, False):
        torch.manual_seed(1)
        layer = nn.Sequential(make_norm(fast), nn.PReLU(init=slope)).to(dtype)
        with torch.no_grad():
            layer[0].weight.uniform_(0.5, 1.5)
            layer[0].bias.uniform_(-0.5, 0.5)
        xi = x.clone().requires_grad_(True)
        normed = layer[0](xi)
        version = normed._version
        y = cpu_training.prelu_after_norm(layer[1], normed) if fast else layer[1](normed)
        if fast:
            assert (y is normed and normed._version > version) == (slope > 0)
        y.backward(grad)
        results.append([y.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10 if dtype == torch.float64 else 1e-4,
                                   atol=1e-10 if dtype == torch.float64 else 1e-4 * magnitude(b))


def _in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (B, C, D, H, W) contiguous, channels-last, or as channels 2.. of a wider contiguous map (a slice)."""
    if layout == "channel_slice":
        wide = torch.zeros(t.shape[0], t.shape[1] + 4, *t.shape[2:], dtype=t.dtype)
        wide[:, 2:2 + t.shape[1]] = t
        return wide[:, 2:2 + t.shape[1]]
    return t.contiguous(memory_format=torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("output_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "channel_slice"])
def test_in_place_scalar_prelu_slope_gradient_in_any_layout(output_layout, grad_layout):
    """The slope's gradient pairs each output element with its own gradient element whatever the two layouts (the
    gradient of a concatenated map arrives as a channel slice), in float64 as ``nn.PReLU``'s; where both are dense
    in one layout the pairing is made of views, without copies."""
    torch.manual_seed(0)
    x = _in_layout(torch.randn(2, 3, 4, 5, 6, dtype=torch.float64), output_layout)
    grad = _in_layout(torch.randn(2, 3, 4, 5, 6, dtype=torch.float64), grad_layout)
    slopes = []
    for fast in (True, False):
        act = nn.PReLU(init=0.25).double()
        xi = x.clone(memory_format=torch.preserve_format).requires_grad_(True)
        normed = nn.GroupNorm(3, 3).double()(xi)
        y = cpu_training.prelu_after_norm(act, normed) if fast else act(normed)
        assert (y is normed) == fast  # the fast one in place
        y.backward(grad)
        slopes.append(act.weight.grad)
    torch.testing.assert_close(slopes[0], slopes[1], rtol=1e-10, atol=1e-12)

    values = torch.arange(2 * 3 * 4 * 5 * 6, dtype=torch.float64).view(2, 3, 4, 5, 6)
    x, grad = _in_layout(values, output_layout), _in_layout(values, grad_layout)
    flat_x, flat_grad = cpu_kernels._flat_in_memory_order(x, grad)
    assert torch.equal(flat_x, flat_grad)  # element for element
    assert torch.equal(flat_x.sort().values, values.flatten())
    views = flat_x.data_ptr() == x.data_ptr() and flat_grad.data_ptr() == grad.data_ptr()
    assert views == (output_layout == grad_layout)


def test_in_place_scalar_prelu_leaves_views_and_leaves_alone():
    weight = nn.PReLU().weight

    def act(x):
        return cpu_kernels.scalar_prelu(x, weight, in_place=True)

    base = torch.randn(2, 4, 6, requires_grad=True) * 1.0
    view = base[:, :2]
    assert act(view) is not view  # a view: in place would make autograd copy its base's gradient
    leaf = torch.randn(2, 4, 6, requires_grad=True)
    assert act(leaf) is not leaf
    fresh = leaf * 1.0
    assert act(fresh) is fresh


def test_scalar_prelu_declines_where_it_does_not_apply():
    x, w = torch.randn(2, 3, 4, 4), torch.tensor([0.25])
    assert cpu_kernels.scalar_prelu(x, torch.tensor([0.25, 0.1, 0.2])) is None  # per-channel slopes
    assert cpu_kernels.scalar_prelu(x.half(), w.half()) is None
    with torch.no_grad():
        assert cpu_kernels.scalar_prelu(x, w) is None  # inference: a training kernel only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.scalar_prelu(x, w) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dim,kernel,padding,dilation,bias", [
    (3, (9, 9, 9), (4, 4, 4), (1, 1, 1), True),    # LGMSNet-3D's LMS kernels, 'same'
    (3, (3, 1, 3), (1, 0, 1), (1, 1, 1), True),    # a plan kernel of 1 on one axis
    (3, (3, 3, 3), (0, 0, 0), (1, 1, 1), True),    # 'valid': GLIMS's dilated convs on their sub-grids
    (3, (3, 3, 3), (2, 2, 2), (2, 2, 2), False),   # dilated, 'same'
    (2, (5, 3), (1, 1), (1, 2), True),             # uneven padding per axis, below 'same'
])
def test_depthwise_conv_equals_the_conv_forward_and_backward(dtype, channels_last, dim, kernel, padding, dilation,
                                                             bias):
    """Stride-1 depthwise convs with the input gradient computed as a forward conv with the flipped kernel: values
    and all three gradients of ``F.conv2d/conv3d`` (odd sizes, so the flipped padding is checked on every axis)."""
    torch.manual_seed(0)
    conv = (nn.Conv2d if dim == 2 else nn.Conv3d)(4, 4, kernel, padding=padding, dilation=dilation, groups=4,
                                                  bias=bias).to(dtype)
    x = torch.randn((2, 4, 11, 8, 9)[:dim + 2], dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dim == 2 else torch.channels_last_3d)
    results = conv_results_fast_and_plain(conv, x, cpu_kernels.depthwise_conv_module)
    for a, b in zip(*results):
        close(a, b, magnitude(b))
    assert len(results[0]) == (4 if bias else 3)


def test_depthwise_conv_declines_where_it_does_not_apply():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    assert cpu_kernels.depthwise_conv_module(depthwise, x) is not None
    assert cpu_kernels.depthwise_conv_module(nn.Conv2d(4, 4, 3, padding=1, groups=2), x) is None  # not depthwise
    assert cpu_kernels.depthwise_conv_module(nn.Conv2d(4, 4, 3, stride=2, groups=4), x) is None
    assert cpu_kernels.depthwise_conv_module(nn.Conv2d(4, 4, 3, padding="same", groups=4), x) is None
    assert cpu_kernels.depthwise_conv_module(nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"),
                                              x) is None
    assert cpu_kernels.depthwise_conv(x, depthwise.weight, None, (3, 3), (1, 1)) is None  # padding > k - 1
    with torch.no_grad():
        assert cpu_kernels.depthwise_conv_module(depthwise, x) is None  # inference: the plain conv is as fast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.depthwise_conv_module(depthwise, x) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,depth,kernel,padding,dilation,pixels", [
    (3, 7, (3, 3, 3), (1, 1, 1), (1, 1, 1), 65536),   # GLIMS's DACB (and its sub-grid stacks): 'same' 3x3x3
    (2, 11, (9, 9, 9), (4, 4, 4), (1, 1, 1), 150),    # LGMSNet-3D's widest LMS kernel; calls of two images
    (3, 6, (3, 1, 3), (1, 0, 1), (1, 1, 1), 1),       # a plan kernel of 1 on one axis; one row per call
    (2, 9, (3, 3, 3), (2, 2, 2), (2, 2, 2), 65536),   # dilated, 'same': offsets of two images
    (1, 5, (5, 3, 3), (2, 1, 1), (1, 1, 1), 65536),   # one sample: no pairs across samples
])
def test_depthwise3d_weight_grad_equals_the_3d_kernel(dtype, batch, depth, kernel, padding, dilation, pixels):
    """The folded 2D weight gradient equals ``convolution_backward``'s 3D one: exactly in float64, within round-off
    in float32; the pairs that cross samples in the folded batch are subtracted (batches of 2-3)."""
    torch.manual_seed(0)
    cl = dict(memory_format=torch.channels_last_3d)
    x = torch.randn(batch, 4, depth, 8, 9, dtype=dtype).contiguous(**cl)
    grad_out = torch.randn(batch, 4, depth, 8, 9, dtype=dtype).contiguous(**cl)
    weight = torch.randn(4, 1, *kernel, dtype=dtype)
    expected = torch.ops.aten.convolution_backward(grad_out, x, weight, None, [1] * 3, list(padding), list(dilation),
                                                   False, [0] * 3, 4, [False, True, False])[1]
    got = cpu_kernels.depthwise3d_weight_grad(x, grad_out, kernel, padding, dilation, pixels=pixels)
    close(got, expected, magnitude(expected))
    assert got.dtype == dtype and got.shape == weight.shape


def test_depthwise3d_weight_grad_declines_where_it_does_not_apply():
    cl = dict(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 4, 5, 6, 6).contiguous(**cl)
    same = ((3, 3, 3), (1, 1, 1), (1, 1, 1))
    assert cpu_kernels.depthwise3d_weight_grad(x, x.clone(), *same) is not None
    assert cpu_kernels.depthwise3d_weight_grad(x.contiguous(), x.contiguous(), *same) is None  # NCDHW
    valid = x[:, :, 1:-1].contiguous(**cl)  # 'valid' padding: output depth 3, input 5
    assert cpu_kernels.depthwise3d_weight_grad(x, valid, (3, 3, 3), (0, 0, 0), (1, 1, 1)) is None
    # a kernel depth offset of 5 on a depth of 5 would pair images two samples apart
    assert cpu_kernels.depthwise3d_weight_grad(x, x.clone(), (3, 3, 3), (5, 1, 1), (5, 1, 1)) is None


@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
def test_depthwise_conv_backward_takes_the_folded_weight_grad_in_3d_channels_last(monkeypatch, grad_layout):
    """A channels-last 3D depthwise conv gets its weight gradient folded, also when its output gradient arrives
    NCDHW (the gradient is brought to the input's layout first)."""
    applied = []
    real = cpu_kernels.depthwise3d_weight_grad
    monkeypatch.setattr(cpu_kernels, "depthwise3d_weight_grad",
                        lambda *a, **k: applied.append(real(*a, **k) is not None) or real(*a, **k))
    conv = nn.Conv3d(4, 4, 3, padding=1, groups=4)
    x = torch.randn(2, 4, 5, 6, 6).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    y = cpu_kernels.depthwise_conv_module(conv, x)
    grad = torch.ones(y.shape)
    y.backward(grad.contiguous(memory_format=torch.channels_last_3d) if grad_layout == "channels_last" else grad)
    assert applied == [True]
    torch.testing.assert_close(conv.bias.grad, torch.full((4,), 2 * 5 * 6 * 6.0))


def test_lms_3d_and_dacb_train_through_the_fast_depthwise_backward(monkeypatch):
    """The accelerated LGMSNet-3D LMS block and GLIMS DACB (dilated convs on sub-grids included) route every
    depthwise conv through it when training on CPU, and the reference blocks none (the network-level equality with
    the reference is in test_golden.py)."""
    from nnunetv2_lgms.networks.glims_blocks import DACB
    calls = []
    real = cpu_kernels._DepthwiseConv.apply
    monkeypatch.setattr(cpu_kernels._DepthwiseConv, "apply", lambda *a: calls.append(a[1].shape) or real(*a))
    x = torch.randn(2, 8, 6, 7, 6, requires_grad=True)
    lms = lgms_blocks.LocalMultiscaleBlock(nn.Conv3d, 8, nn.InstanceNorm3d)
    lms(x).sum().backward()
    assert calls == []
    accelerated(lms)(x).sum().backward()
    assert [tuple(s[2:]) for s in calls] == [(3, 3, 3), (5, 5, 5), (7, 7, 7), (9, 9, 9)]
    calls.clear()
    dacb = DACB(nn.Conv3d, 8, 16)
    dacb(x).sum().backward()
    assert calls == []
    accelerated(dacb)(x).sum().backward()
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,kernel,bias,block", [
    ((2, 32, 9, 11), (3, 3), True, 8192),   # one block
    ((3, 32, 13, 10), (3, 3), False, 50),   # blocks that split rows and samples
    ((2, 33, 7, 12), (1, 3), True, 37),     # a plan kernel of 1 on one axis
    ((1, 40, 6, 5), (5, 3), True, 16),      # a wider kernel, taps reaching two rows away
])
def test_conv2d_gemm_weight_grad_equals_the_conv_forward_and_backward(dtype, shape, kernel, bias, block):
    """Dense 'same' 2D convs whose weight gradient is one GEMM per tap on padded flat pixel matrices: values and all
    three gradients of ``F.conv2d`` (odd map sizes; block sizes that cut rows, samples and the padding)."""
    torch.manual_seed(0)
    c_in = shape[1]
    conv = nn.Conv2d(c_in, 32, kernel, padding=tuple(k // 2 for k in kernel), bias=bias).to(dtype)
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    results = conv_results_fast_and_plain(
        conv, x, lambda c, t: cpu_kernels.conv2d_gemm_weight_grad(t, c.weight, c.bias, c.padding, block_pixels=block))
    for a, b in zip(*results):
        close(a, b, magnitude(b))
    assert len(results[0]) == (4 if bias else 3)


def test_conv2d_gemm_weight_grad_declines_where_it_does_not_apply():
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    conv = nn.Conv2d(32, 32, 3, padding=1)
    assert cpu_kernels.conv2d_gemm_weight_grad_module(conv, x) is not None
    assert cpu_kernels.conv2d_gemm_weight_grad_module(conv, x.detach().contiguous()) is None  # NCHW
    assert cpu_kernels.conv2d_gemm_weight_grad_module(nn.Conv2d(32, 16, 3, padding=1), x) is None  # 512 pairs
    assert cpu_kernels.conv2d_gemm_weight_grad_module(nn.Conv2d(32, 32, 3, padding=1, groups=2), x) is None
    assert cpu_kernels.conv2d_gemm_weight_grad_module(nn.Conv2d(32, 32, 3, stride=2, padding=1), x) is None
    assert cpu_kernels.conv2d_gemm_weight_grad_module(nn.Conv2d(32, 32, 3, padding=1, dilation=2), x) is None
    assert cpu_kernels.conv2d_gemm_weight_grad_module(nn.Conv2d(32, 32, 3, padding=0), x) is None  # not 'same'
    assert cpu_kernels.conv2d_gemm_weight_grad_module(nn.Conv2d(32, 32, 3, padding="same"), x) is None
    assert cpu_kernels.conv2d_gemm_weight_grad_module(nn.Conv2d(32, 32, 4, padding=2), x) is None  # even kernel
    assert cpu_kernels.conv2d_gemm_weight_grad_module(nn.Conv2d(32, 32, 1), x) is None  # 1x1: oneDNN is as fast
    assert cpu_kernels.conv2d_gemm_weight_grad_module(
        nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"), x) is None
    assert cpu_kernels.conv2d_gemm_weight_grad_module(nn.Conv3d(32, 32, 3, padding=1), x.unsqueeze(2)) is None
    with torch.no_grad():
        assert cpu_kernels.conv2d_gemm_weight_grad_module(conv, x) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.conv2d_gemm_weight_grad_module(conv, x) is None


def test_lgmsnet_2d_trains_its_wide_convs_through_the_gemm_weight_grad(monkeypatch):
    """Which convs of the accelerated LGMSNet-2D take the path at nnU-Net's widths (the network-level equality with
    the reference is in test_golden.py): the GMS blocks' 3x3 convs, the UpConvs and FusionConv's per-part convs from
    32 channels up; not the 1x1 convs, the stem, the LMS expansion (4 -> 16) nor the level-0 convs of 16 channels.
    The kernel's entry points as the accelerated modules call them (acceleration.cpu_training's namespace) are
    counted too: every applied GEMM weight gradient came through them."""
    from nnunetv2_lgms.networks.lgmsnet import LGMSNet
    calls, entries = [], []
    real = cpu_kernels._Conv2dGemmWeightGrad.apply
    monkeypatch.setattr(cpu_kernels._Conv2dGemmWeightGrad, "apply",
                        lambda x, w, *a: calls.append(tuple(w.shape[:2])) or real(x, w, *a))
    for name in ("conv2d_gemm_weight_grad", "conv2d_gemm_weight_grad_module"):
        def counting(*a, _real=getattr(cpu_training, name), **k):
            y = _real(*a, **k)
            entries.append(y is not None)
            return y
        monkeypatch.setattr(cpu_training, name, counting)
    torch.manual_seed(0)
    reference = LGMSNet(3, 2, nn.Conv2d, deep_supervision=True)
    x = torch.randn(2, 3, 64, 64)
    sum(o.sum() for o in reference(x)).backward()
    assert calls == [] and entries == []  # the reference network runs none of it
    net = accelerated(reference)
    sum(o.sum() for o in net(x)).backward()
    assert entries.count(True) == len(calls)
    assert sorted(calls) == sorted([
        (128, 64), (128, 192), (128, 128), (128, 256),  # encoder GMS 3 and 4: local and merge 3x3s
        (128, 128), (128, 256), (128, 384),  # decoder level 3: UpConv, GMS local and merge
        (64, 128), (64, 64), (64, 64), (64, 64), (64, 128),  # level 2: UpConv, FusionConv's parts, GMS local, merge
        (32, 64), (32, 32), (32, 32),  # level 1: UpConv, FusionConv's parts
    ]), calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,groups,affine", [
    ((2, 6, 5, 7, 9), 6, True),     # InstanceNorm with affine (nnU-Net's 3D norm)
    ((3, 6, 5, 7, 9), 6, False),    # GLIMS's InstanceNorm (affine=False)
    ((2, 8, 11, 13), 2, True),      # a GroupNorm with 4 channels per group, 2D
    ((2, 4, 300, 150), 4, True),    # more pixels than one block: the blockwise sums across blocks
])
def test_group_norm_channels_last_equals_group_norm(dtype, shape, groups, affine):
    """Values and all gradients of ``F.group_norm`` (``groups = C``: ``F.instance_norm``), output channels-last,
    and float32 precise where PyTorch's own channels-last GroupNorm is not (channel mean large against its spread)."""
    torch.manual_seed(0)
    c = shape[1]
    fmt = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    x = (torch.randn(shape, dtype=dtype) * torch.rand(1, c, *[1] * (len(shape) - 2), dtype=dtype) * 3
         + torch.randn(1, c, *[1] * (len(shape) - 2), dtype=dtype) * 4)
    weight = (torch.rand(c, dtype=dtype) + 0.5) if affine else None
    bias = torch.randn(c, dtype=dtype) if affine else None
    grad = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    results = []
    for fast in (True, False):
        xi = x.contiguous(memory_format=fmt) if fast else x.double()
        xi.requires_grad_(True)
        params = [None if t is None else t.clone().to(xi.dtype).requires_grad_(True) for t in (weight, bias)]
        y = cpu_kernels.group_norm_channels_last(xi, groups, *params, 1e-5) if fast else two_pass_group_norm(
            xi, groups, *params, 1e-5)
        y.backward(grad.to(y.dtype))
        if fast:
            assert y.is_contiguous(memory_format=fmt)
        results.append([y.detach(), xi.grad] + [p.grad for p in params if p is not None])
    for a, b in zip(*results):
        close(a, b.to(a.dtype), magnitude(b))
    offset = x.contiguous(memory_format=fmt) * 0.01 + 100
    precise = cpu_kernels.group_norm_channels_last(offset, groups, weight, bias, 1e-5)
    reference = two_pass_group_norm(offset.double(), groups, *[None if t is None else t.double()
                                                               for t in (weight, bias)], 1e-5)
    close(precise, reference.to(precise.dtype), magnitude(reference))


def two_pass_group_norm(x, groups, weight, bias, eps):
    """GroupNorm written out (two-pass variance), differentiable: the float64 reference."""
    grouped = x.reshape(x.shape[0], groups, -1)
    centred = grouped - grouped.mean(-1, keepdim=True)
    y = (centred / (centred.square().mean(-1, keepdim=True) + eps).sqrt()).reshape(x.shape)
    view = (1, -1) + (1,) * (x.ndim - 2)
    y = y if weight is None else y * weight.view(view)
    return y if bias is None else y + bias.view(view)


def test_group_norm_channels_last_declines_where_it_does_not_apply():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    assert cpu_kernels.group_norm_channels_last(x, 4, None, None, 1e-5) is not None
    assert cpu_kernels.group_norm_channels_last(x, 3, None, None, 1e-5) is None  # 4 channels in 3 groups
    assert cpu_kernels.group_norm_channels_last(x.half(), 4, None, None, 1e-5) is None
    assert cpu_kernels.group_norm_channels_last(x[:, :, :, ::2], 4, None, None, 1e-5) is None  # not dense
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.group_norm_channels_last(x, 4, None, None, 1e-5) is None


def test_accelerated_instance_norm_keeps_channels_last_and_the_state_dict():
    from nnunetv2_lgms.acceleration import reference_copy, registered
    from nnunetv2_lgms.networks.lgmsnet import LGMSNet
    assert registered()[nn.InstanceNorm3d, "cpu_training"] is cpu_training.InstanceNorm3d
    assert not any(ref is nn.BatchNorm3d for ref, _ in registered())  # BatchNorm stays stock
    reference = LGMSNet(1, 2, nn.Conv3d, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True})
    assert type(reference.encoder.stem[1]) is nn.InstanceNorm3d  # nnU-Net's plan gives nn.InstanceNorm3d
    net = accelerated(reference)
    assert isinstance(net.encoder.stem[1], cpu_training.InstanceNorm3d)
    assert type(reference_copy(net).encoder.stem[1]) is nn.InstanceNorm3d
    assert net.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 6, 5, 7, 4).contiguous(memory_format=torch.channels_last_3d)
    ours, stock = cpu_training.InstanceNorm3d(6, affine=True), nn.InstanceNorm3d(6, affine=True)
    assert ours.state_dict().keys() == stock.state_dict().keys()
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, stock(x.contiguous()), rtol=1e-5, atol=1e-5)
    assert not stock(x).is_contiguous(memory_format=torch.channels_last_3d)  # why it exists


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 4, 7), (2, 6, 3, 4, 5), (2, 1, 3, 4, 5)], ids=["2d", "3d", "3d-1ch"])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_equals_the_conv_forward_and_backward(dtype, shape, bias):
    """The 1x1 conv as batched GEMMs: output, input gradient and both parameter gradients of the conv module."""
    torch.manual_seed(0)
    conv = (nn.Conv2d if len(shape) == 4 else nn.Conv3d)(shape[1], 7, 1, bias=bias).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    results = conv_results_fast_and_plain(conv, x, cpu_kernels.pointwise_conv)
    assert results[0][0].shape == (shape[0], 7, *shape[2:])
    assert len(results[0]) == (4 if bias else 3)
    for a, b in zip(*results):
        close(a, b, magnitude(b))


def test_pointwise_conv_declines_where_it_does_not_apply():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    conv = nn.Conv2d(4, 3, 1)
    assert cpu_kernels.pointwise_conv(conv, x) is not None
    assert cpu_kernels.pointwise_conv(conv, x.contiguous(memory_format=torch.channels_last)) is None
    assert cpu_kernels.pointwise_conv(conv, x[:, :, ::2]) is None  # not contiguous
    for other in (nn.Conv2d(4, 3, 3), nn.Conv2d(4, 3, 1, stride=2), nn.Conv2d(4, 4, 1, groups=2),
                  nn.Conv2d(4, 3, 1, padding=1), nn.ConvTranspose2d(4, 3, 1), nn.Conv2d(5, 3, 1)):
        assert cpu_kernels.pointwise_conv(other, x) is None, other
    assert cpu_kernels.pointwise_conv(conv.double(), x) is None  # dtypes differ
    with torch.no_grad():
        assert cpu_kernels.pointwise_conv(nn.Conv2d(4, 3, 1), x) is None  # inference: a training kernel only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.pointwise_conv(nn.Conv2d(4, 3, 1), x) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_on_parts_equals_the_conv_on_their_concatenation(dtype, bias):
    """Several maps as the conv's input channels (one GEMM per part, summed in place): the output, every part's
    gradient (each contiguous) and both parameter gradients of ``conv(torch.cat(parts, dim=1))``."""
    torch.manual_seed(0)
    conv = nn.Conv3d(9, 5, 1, bias=bias).to(dtype)
    parts = [torch.randn(2, c, 3, 4, 5, dtype=dtype) for c in (2, 3, 4)]
    results = []
    for fast in (True, False):
        inputs = [p.clone().requires_grad_(True) for p in parts]
        conv.zero_grad()
        y = cpu_kernels.pointwise_conv(conv, inputs) if fast else conv(torch.cat(inputs, dim=1))
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y))
        results.append([y.detach()] + [p.grad for p in inputs] + [p.grad.clone() for p in conv.parameters()])
    for a, b in zip(*results):
        close(a, b, magnitude(b))
    assert all(g.is_contiguous() for g in results[0][1:4])


def test_pointwise_conv_on_parts_declines_where_it_does_not_apply():
    conv = nn.Conv3d(5, 3, 1)
    a, b = torch.randn(2, 2, 3, 4, 5), torch.randn(2, 3, 3, 4, 5)
    assert cpu_kernels.pointwise_conv(conv, [a, b]) is not None
    assert cpu_kernels.pointwise_conv(conv, [a, b[:, :2]]) is None  # 4 channels for a 5-channel conv
    assert cpu_kernels.pointwise_conv(conv, [a, b[:, :, :2].contiguous()]) is None  # other spatial size
    assert cpu_kernels.pointwise_conv(conv, [a, b[:1]]) is None  # other batch
    assert cpu_kernels.pointwise_conv(conv, [a, b.contiguous(memory_format=torch.channels_last_3d)]) is None


@pytest.mark.parametrize("fast", [True, False], ids=["accelerated", "reference"])
def test_dacb_training_forms_no_branch_concatenation(fast):
    """The accelerated DACB in CPU training: its first 1x1 conv sums one GEMM per branch instead of convolving their
    concatenation, which the reference block forms (equality: the next test)."""
    from torch.profiler import profile
    from nnunetv2_lgms.networks.glims_blocks import DACB
    torch.manual_seed(0)
    block = DACB(nn.Conv3d, 4, 8).train()
    if fast:
        block = accelerated(block)
    x = torch.randn(2, 4, 6, 7, 6, requires_grad=True)
    with profile() as prof:
        y = block(x)
    y.sum().backward()  # (its only concatenation joins the 1x1 weight's gradient parts)
    cats = sum(e.count for e in prof.key_averages() if e.key == "aten::cat")
    assert cats == (0 if fast else 1)


@pytest.mark.parametrize("dim", [2, 3])
def test_dacb_training_on_branch_parts_equals_the_plain_block(dim):
    """The accelerated DACB in CPU training (branch parts, sub-grids, the depthwise convs' backward, PReLUs in place)
    against the reference block, float64: output, input gradient and every parameter gradient, in 2D and 3D."""
    from nnunetv2_lgms.networks.glims_blocks import DACB
    torch.manual_seed(0)
    plain = DACB(nn.Conv2d if dim == 2 else nn.Conv3d, 4, 8).double().train()
    block = accelerated(plain)
    assert isinstance(block, cpu_training.DACB) and type(plain) is DACB
    x = torch.randn((2, 4, 9, 7, 6)[:dim + 2], dtype=torch.float64)
    results = []
    for net in (block, plain):
        xi = x.clone().requires_grad_(True)
        y = net(xi)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=x.dtype).view_as(y))
        results.append([y.detach(), xi.grad] + [p.grad for p in net.parameters() if p.requires_grad])
    scale = max(magnitude(b) for b in results[1])  # (conv biases before a norm get zero gradients up to round-off)
    for a, b in zip(*results):
        close(a, b, scale)


def test_glims_training_runs_its_1x1_convs_and_heads_as_gemms(monkeypatch):
    """Every 1x1 conv of the accelerated GLIMS's conv-IN-PReLU units and all five heads take the GEMM path in CPU
    training (the network-level equality with the reference is in test_golden.py)."""
    from nnunetv2_lgms.networks.glims import GLIMS
    torch.manual_seed(0)
    reference = GLIMS.from_plan((16, 32, 32), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                                [[3, 3, 3]] * 5, 1, 3, deep_supervision=True, feature_size=12).train()
    calls = []

    def pointwise_conv(conv, x):
        y = cpu_kernels.pointwise_conv(conv, x)
        if y is not None:
            calls.append(conv)
        return y

    monkeypatch.setattr(cpu_training, "pointwise_conv", pointwise_conv)
    net = accelerated(reference)
    out = net(torch.randn(2, 1, 16, 32, 32))
    sum(o.sum() for o in out).backward()
    heads = set(net.decoder.seg_layers)
    pointwise_units = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (1, 1, 1)
                       and m not in heads]
    assert sorted(id(c) for c in calls if c not in heads) == sorted(id(c) for c in pointwise_units)
    assert [c for c in calls if c in heads] == [net.decoder.seg_layers[i] for i in range(5)]
