"""Autocast safety. No GPU here, so CPU bfloat16 autocast stands in for CUDA AMP: the attention paths (sparse
attention in LGMSNet, windowed attention with its additive bias and shift mask in GLIMS) must stay finite forward and
backward. (Closeness to float32 is not asserted: with random weights, bfloat16's 8-bit mantissa and the
cancellation in the many instance norms of these nets drift the logits by tens of percent, so such a bound would
test bfloat16, not our code.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nnunetv2_lgms.networks.glims import GLIMS
from nnunetv2_lgms.networks.lgmsnet import LGMSNet


@pytest.mark.parametrize("build, shape", [
    (lambda: LGMSNet(1, 3, nn.Conv2d, deep_supervision=True), (2, 1, 64, 64)),
    (lambda: LGMSNet(1, 3, nn.Conv3d, deep_supervision=True), (1, 1, 32, 32, 32)),
    # 28^3 / 8 = 3.5 -> the 1/8 map is padded for the 7-window and shifted blocks use the mask
    (lambda: GLIMS(1, 3, nn.Conv3d, (64, 64, 64), feature_size=12, deep_supervision=True), (1, 1, 64, 64, 64)),
])
def test_bfloat16_autocast_forward_and_backward_are_finite(build, shape):
    torch.manual_seed(0)
    net = build()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = net(torch.randn(*shape))
    assert outputs[0].dtype == torch.bfloat16  # autocast really ran the convolutions in bfloat16
    assert all(torch.isfinite(o.float()).all() for o in outputs)
    sum(o.float().mean() for o in outputs).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
