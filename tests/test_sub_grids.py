"""Dilated depthwise convs on interleaved sub-grids (nnunetv2_lgms/acceleration/sub_grids.py): equal to the dilated
conv, forward and backward, in both memory formats; the copies in and out are each other's adjoints; declines. The
accelerated DACB trains its dilated convs through them; FLOPs are counted on the reference whatever is accelerated."""
import copy

import pytest
import torch
from torch import nn

from nnunetv2_lgms.acceleration import SETTINGS, accelerate, cpu_training
from nnunetv2_lgms.acceleration.cpu_kernels import is_channels_last, to_channels_last
from nnunetv2_lgms.acceleration.sub_grids import (dilated_depthwise_conv, from_sub_grids, sub_grid_dilation,
                                                  to_sub_grids)
from nnunetv2_lgms.flops import count_flops
from nnunetv2_lgms.networks.glims_blocks import DACB

CASES = [  # conv op, kernel, dilation, spatial size (sizes that the dilation does not divide included)
    (nn.Conv3d, (3, 3, 3), 2, (9, 10, 7)),
    (nn.Conv3d, (3, 3, 3), 3, (8, 11, 6)),
    (nn.Conv3d, (1, 3, 3), 2, (5, 11, 8)),  # nnU-Net's in-plane kernels: no dilation on the first axis
    (nn.Conv2d, (3, 3), 3, (13, 9)),
    (nn.Conv2d, (5, 3), 2, (12, 7)),
]


def _conv(conv_op, kernel, dilation, channels=6):
    padding = tuple((k - 1) // 2 * dilation for k in kernel)
    return conv_op(channels, channels, kernel, padding=padding, dilation=dilation, groups=channels).double()


@pytest.mark.parametrize("dilation, size", [((2, 3), (7, 8)), ((2, 2, 3), (5, 4, 7)), ((1, 2, 2), (3, 5, 6))])
def test_sub_grid_copies_round_trip_and_are_adjoint(dilation, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    stack = to_sub_grids(x, dilation)
    m = [-(-s // d) for s, d in zip(size, dilation)]
    assert stack.shape == (2 * torch.Size(dilation).numel(), 3, *m) and is_channels_last(stack)
    # batch entry b * prod(d) + r holds x[b, :, r0::d0, ...], zero-filled at the ends
    last = tuple(d - 1 for d in dilation)
    index = (slice(None),) + tuple(slice(r, None, d) for r, d in zip(last, dilation))
    part = x[1][index]
    entry = stack[2 * torch.Size(dilation).numel() - 1]
    torch.testing.assert_close(entry[(slice(None),) + tuple(slice(0, n) for n in part.shape[1:])], part,
                               rtol=0, atol=0)
    assert entry.abs().sum() == part.abs().sum()  # the rest is zeros
    for channels_last in (True, False):
        back = from_sub_grids(stack, dilation, size, channels_last)
        torch.testing.assert_close(back, x, rtol=0, atol=0)
        assert is_channels_last(back) == channels_last
    y = torch.randn_like(stack)
    y_dense = from_sub_grids(y, dilation, size, False)
    # <to(x), y> == <x, from(y)>: from_sub_grids is the adjoint of to_sub_grids (the backward of each other)
    torch.testing.assert_close((stack * y).sum(), (x * y_dense).sum())


@pytest.mark.parametrize("conv_op, kernel, dilation, size", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_dilated_depthwise_conv_equals_the_dilated_conv(conv_op, kernel, dilation, size, channels_last):
    torch.manual_seed(0)
    conv = _conv(conv_op, kernel, dilation)
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    if channels_last:
        x = to_channels_last(x)
    x.requires_grad_(True)
    d = sub_grid_dilation(conv, x)
    assert d == tuple(dilation if k > 1 else 1 for k in kernel)
    for fast_backward in (True, False):
        ref = conv(x)
        out = dilated_depthwise_conv(conv, x, d, fast_backward)
        assert is_channels_last(out) == channels_last
        torch.testing.assert_close(out, ref)
        grad = torch.randn_like(ref)
        params = (x, conv.weight, conv.bias)
        for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
            torch.testing.assert_close(a, b)
    with torch.no_grad():
        out = dilated_depthwise_conv(conv, x, d)
    torch.testing.assert_close(out, ref.detach())
    assert is_channels_last(out) == channels_last


def test_float32_sub_grid_conv_matches_the_dilated_conv():
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 8, 3, padding=3, dilation=3, groups=8)
    x = to_channels_last(torch.randn(2, 8, 10, 13, 11))
    with torch.no_grad():
        torch.testing.assert_close(dilated_depthwise_conv(conv, x, (3, 3, 3)), conv(x), rtol=1e-5, atol=1e-5)


def test_sub_grid_dilation_declines():
    x3 = torch.randn(1, 4, 6, 6, 6)
    assert sub_grid_dilation(nn.Conv3d(4, 4, 3, padding=1, groups=4), x3) is None  # undilated
    assert sub_grid_dilation(nn.Conv3d(4, 4, 3, padding=1, dilation=2, groups=4), x3) is None  # not 'same'
    assert sub_grid_dilation(nn.Conv3d(4, 4, 3, padding=2, dilation=2, stride=2, groups=4), x3) is None
    assert sub_grid_dilation(nn.Conv3d(4, 4, 3, padding=2, dilation=2, groups=2), x3) is None  # not depthwise
    assert sub_grid_dilation(nn.Conv3d(4, 4, 2, padding=1, dilation=2, groups=4), x3) is None  # even kernel
    assert sub_grid_dilation(nn.Conv3d(4, 4, 3, padding=2, dilation=2, groups=4, padding_mode="reflect"),
                             x3) is None
    assert sub_grid_dilation(nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), x3) is None  # rank
    assert sub_grid_dilation(nn.Conv3d(4, 4, 3, padding=2, dilation=2, groups=4), x3) == (2, 2, 2)


@pytest.mark.parametrize("conv_op, size", [(nn.Conv3d, (10, 9, 11)), (nn.Conv2d, (14, 13))])
def test_dacb_training_takes_the_sub_grid_path_and_matches_the_reference(monkeypatch, conv_op, size):
    """The accelerated DACB in CPU training runs its two dilated convs (dilations 2 and 3) on sub-grids, the
    undilated one not; the reference block none. Outputs and input gradients agree."""
    torch.manual_seed(0)
    reference = DACB(conv_op, 8, 16).train()
    block = accelerate(copy.deepcopy(reference), tuple(SETTINGS))[0]
    x = torch.randn(2, 8, *size)
    calls = []
    real = cpu_training.dilated_depthwise_conv
    monkeypatch.setattr(cpu_training, "dilated_depthwise_conv",
                        lambda c, t, d, *a: calls.append(d) or real(c, t, d, *a))
    results = []
    for net in (block, reference):
        xi = x.clone().requires_grad_(True)
        y = net(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        results.append((y.detach(), xi.grad))
        assert calls == ([(2,) * len(size), (3,) * len(size)] if net is block else [])
        calls.clear()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("name", ["lgmsnet-2d", "glims-3d"])
def test_flop_counting_is_the_same_for_a_network_and_its_accelerated_copy(name):
    """``count_flops`` counts the reference architecture: the accelerated copy (sub-grid convs, GEMMs, blockwise
    stacks in its training paths; runtimes and graphs in inference) gives the same count, and stays accelerated."""
    from nnunetv2_lgms.acceleration import accelerated_modules
    from nnunetv2_lgms.networks.glims import GLIMS
    from nnunetv2_lgms.networks.lgmsnet import LGMSNet
    torch.manual_seed(0)
    if name == "lgmsnet-2d":
        net, shape = LGMSNet(3, 2, nn.Conv2d), (1, 3, 32, 32)
    else:
        net = GLIMS.from_plan((4, 32, 32), [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                              [[3, 3, 3]] * 5, 1, 3, deep_supervision=False, feature_size=12)
        shape = (1, 1, 4, 32, 32)  # (the smallest bottleneck an InstanceNorm takes: 1 x 2 x 2)
    fast = accelerate(copy.deepcopy(net), tuple(SETTINGS))[0]
    modules = accelerated_modules(fast)
    assert modules and not accelerated_modules(net)
    flops = count_flops(net, shape)
    assert flops > 0
    assert count_flops(fast, shape) == flops
    assert accelerated_modules(fast) == modules
