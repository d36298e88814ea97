"""GLIMS network and trainer: published parameter counts, nnU-Net plan shapes and deep-supervision contract, the
CSAB spatial-gate defect, SDPA window attention vs. the explicit formula, and the AdamW warm-up/cosine recipe.

Shape tests of every plan run on the ``meta`` device (same code path, no arithmetic; seconds for 47M parameters);
smaller plans also run a real CPU forward. Real CPU forwards at 128^3 and 40x224x192 are marked ``slow``.
"""
from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_lgms.flops import count_flops
from nnunetv2_lgms.networks import swin
from nnunetv2_lgms.networks.glims import GLIMS, glims_deep_supervision_scales, glims_strides
from nnunetv2_lgms.acceleration import accelerate
from nnunetv2_lgms.acceleration.cpu_training import DACB as AcceleratedDACB
from nnunetv2_lgms.networks.glims_blocks import CSAB, DACB
from nnunetv2_lgms.trainers.nnUNetTrainerGLIMS import (WarmupCosineLRScheduler, nnUNetTrainerGLIMS,
                                                       nnUNetTrainerGLIMS_5epochs, nnUNetTrainerGLIMS_smoke)

import plans_utils

BRATS_PARAMS = 47_163_349
BTCV_PARAMS = 47_167_281

SMALL_ANISO = "3d_16x96x64_aniso_small"  # real CPU forward: shrunk windows (4, 6, 4), (1,2,2) merge, (1,3,3) kernels
PLANS = dict(plans_utils.PLANS)
PLANS[SMALL_ANISO] = ((16, 96, 64), [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                      [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]])
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 4,
                "file_ending": ".nii.gz"}


def plan_managers(name):
    if name in plans_utils.PLANS:
        return plans_utils.managers(name)
    patch, strides, kernels = PLANS[name]
    plans = plans_utils.plans_dict("2d_256")
    plans["configurations"] = {"cfg": plans_utils.configuration_dict(patch, strides, kernels)}
    pm = PlansManager(plans)
    return pm, pm.get_configuration("cfg")


def trainer_scales(configuration_manager, enable=True):
    """The deep-supervision scales exactly as the trainer computes them."""
    trainer = object.__new__(nnUNetTrainerGLIMS)  # only the attributes _get_deep_supervision_scales reads
    trainer.configuration_manager, trainer.enable_deep_supervision = configuration_manager, enable
    return trainer._get_deep_supervision_scales()


def expected_sizes(patch, scales):
    return [tuple(int(round(p * s)) for p, s in zip(patch, scale)) for scale in scales]


# ------------------------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("in_ch, out_ch, reference", [(4, 3, BRATS_PARAMS), (1, 14, BTCV_PARAMS)])
def test_published_parameter_counts(in_ch, out_ch, reference):
    with torch.device("meta"):
        net = GLIMS(in_ch, out_ch, nn.Conv3d, (96, 96, 96), deep_supervision=True)
    assert net.num_parameters() == reference
    aux = 16 * 24 * out_ch + out_ch  # the nnU-Net-only head on t4_post (384 channels)
    assert net.num_parameters(include_auxiliary_heads=True) == reference + aux
    # the three deepest Swin stages hold ~87% of the parameters (spec §3.5)
    swin_deep = sum(p.numel() for m in (net.encoder.t4_pre, net.encoder.t4, net.decoder.t4_post)
                    for p in m.parameters())
    assert 0.85 < swin_deep / reference < 0.89


def test_flops_match_the_official_count():
    # FlopCounterMode on the official code: 114.31 GFLOPs (BTCV) / 113.97 GFLOPs (BraTS) at 96^3 (spec §4).
    # Counted on the meta device (shapes only, ~1 s); paper-check counts on CPU and gets the same numbers, which
    # the 2D check below confirms for the CPU code path.
    from nnunetv2_lgms.flops import count_flops
    with torch.device("meta"):
        btcv, brats = GLIMS(1, 14), GLIMS(4, 3)
    assert count_flops(btcv, (1, 1, 96, 96, 96), device="meta") / 1e9 == pytest.approx(114.3075, abs=0.001)
    assert count_flops(brats, (1, 4, 96, 96, 96), device="meta") / 1e9 == pytest.approx(113.9678, abs=0.001)
    with torch.device("meta"):
        meta_2d = GLIMS(1, 2, nn.Conv2d, (64, 64), feature_size=12)
    cpu_2d = GLIMS(1, 2, nn.Conv2d, (64, 64), feature_size=12)
    assert count_flops(cpu_2d, (1, 1, 64, 64)) == count_flops(meta_2d, (1, 1, 64, 64), device="meta")


def test_paper_config_rows():
    from nnunetv2_lgms.paper_configs import PAPER_CONFIGS
    rows = {c.model: c for c in PAPER_CONFIGS if c.model.startswith("GLIMS")}
    assert rows["GLIMS-BraTS"].reference_params == BRATS_PARAMS
    assert rows["GLIMS-BTCV"].reference_params == BTCV_PARAMS
    assert rows["GLIMS-BTCV"].input_shape == (1, 1, 96, 96, 96)
    assert "47.16M" in rows["GLIMS-BTCV"].paper and "72.30G" in rows["GLIMS-BTCV"].paper


def test_fix_spatial_gate_changes_only_the_layernorms():
    with torch.device("meta"):
        faithful = GLIMS(1, 14)
        fixed = GLIMS(1, 14, fix_spatial_gate=True)
    assert faithful.num_parameters() - fixed.num_parameters() == 5 * 2  # LayerNorm(1) of the five CSABs


def test_feature_size_must_be_multiple_of_12():
    with pytest.raises(ValueError, match="12"):
        GLIMS(1, 2, feature_size=16)


# --------------------------------------------------------------------------------- shapes and deep supervision
@pytest.mark.parametrize("name", ["2d_256", "2d_512x448", "2d_48_3pools", "3d_96", "3d_128",
                                  "3d_40x56x40_hippocampus", "3d_40x224x192_aniso", SMALL_ANISO])
def test_plan_shapes_and_deep_supervision_meta(name):
    pm, cm = plan_managers(name)
    patch = tuple(cm.patch_size)
    scales = trainer_scales(cm)
    assert len(scales) == 5 and list(scales[0]) == [1.0] * len(patch)
    assert trainer_scales(cm, enable=False) is None
    with torch.device("meta"):
        net = nnUNetTrainerGLIMS.build_network_architecture(pm, cm, 2, 3, True)
        outputs = net(torch.empty(2, 2, *patch))
        assert isinstance(outputs, list) and len(outputs) == len(scales)
        assert [tuple(o.shape[2:]) for o in outputs] == expected_sizes(patch, scales)
        assert all(o.shape[:2] == (2, 3) for o in outputs)
        # each output i: patch / cumprod(first six plan strides)[i]
        cum = np.cumprod(np.array(glims_strides(cm.pool_op_kernel_sizes, len(patch))), axis=0)
        assert [tuple(o.shape[2:]) for o in outputs] == [tuple(int(v) for v in np.array(patch) // c) for c in cum[:5]]
        net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled(False) does
        single = net(torch.empty(1, 2, *patch))
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (1, 3, *patch)
    assert net.num_parameters() > 40e6  # full-size GLIMS (f = 24) on every plan


@pytest.mark.parametrize("name", ["2d_256", "3d_96", "3d_40x56x40_hippocampus", SMALL_ANISO])
def test_plan_forward_cpu(name):
    """Real arithmetic (reduced width f = 12, batch 1): finite outputs with the contract's shapes."""
    patch, strides, kernels = PLANS[name]
    _, cm = plan_managers(name)
    scales = trainer_scales(cm)
    torch.manual_seed(0)
    net = GLIMS.from_plan(patch, strides, kernels, 1, 3, deep_supervision=True, feature_size=12)
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, *patch))
    assert len(outputs) == len(scales)
    assert [tuple(o.shape) for o in outputs] == [(1, 3, *s) for s in expected_sizes(patch, scales)]
    assert all(torch.isfinite(o).all() for o in outputs)


def test_deep_supervision_off_returns_the_full_resolution_head():
    torch.manual_seed(0)
    net = GLIMS(1, 3, nn.Conv2d, (64, 64), feature_size=12, deep_supervision=True).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        outputs = net(x)
        net.decoder.deep_supervision = False
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 3, 64, 64)
    torch.testing.assert_close(single, outputs[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["3d_128", "3d_40x224x192_aniso"])
def test_big_plan_forward_cpu(name):
    patch, strides, kernels = PLANS[name]
    _, cm = plan_managers(name)
    net = GLIMS.from_plan(patch, strides, kernels, 1, 2, deep_supervision=True, feature_size=12)
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, *patch))
    assert [tuple(o.shape[2:]) for o in outputs] == expected_sizes(patch, trainer_scales(cm))


def test_strides_rules():
    # fewer than five pools: stride 1 on the deepest levels; more than five: extra pools ignored
    assert glims_strides([[1, 1, 1]] + [[2, 2, 2]] * 3, 3) == [(1, 1, 1)] + [(2, 2, 2)] * 3 + [(1, 1, 1)] * 2
    assert glims_strides([[1, 1]] + [[2, 2]] * 6, 2) == [(1, 1)] + [(2, 2)] * 5
    with pytest.raises(ValueError):
        glims_strides([[2, 2]] * 6, 2)
    assert glims_deep_supervision_scales([[1, 1]] + [[2, 2]] * 6, 2)[-1] == [1 / 16, 1 / 16]
    with pytest.raises(ValueError, match="divisible"):
        GLIMS(1, 2, nn.Conv3d, (96, 96, 80))  # 80 is not divisible by 32


def test_wrong_input_size_is_reported():
    with torch.device("meta"):
        net = GLIMS(1, 2, nn.Conv3d, (64, 64, 64))
        with pytest.raises(ValueError, match="patch size"):
            net(torch.empty(1, 1, 96, 96, 96))


def test_anisotropic_kernels_respected():
    patch, strides, kernels = PLANS["3d_40x224x192_aniso"]
    with torch.device("meta"):
        net = GLIMS.from_plan(patch, strides, kernels, 1, 2)
    dacb0 = net.encoder.dmsf[0].blocks[0]
    assert [c.kernel_size for c in dacb0.dilated_convs] == [(1, 3, 3)] * 3
    assert [c.padding for c in dacb0.dilated_convs] == [(0, 1, 1), (0, 2, 2), (0, 3, 3)]
    assert net.encoder.csab[0].spatial_conv.kernel_size == (1, 7, 7)
    assert net.encoder.csab[2].spatial_conv.kernel_size == (7, 7, 7)
    assert net.encoder.dmsf[0].down[0].stride == (1, 2, 2)
    assert net.decoder.dmsu[0].up[0].stride == (1, 2, 2)
    assert net.encoder.t4_pre.downsample.factors == (1, 2, 2)
    assert len(net.encoder.t4_pre.downsample.offsets) == 4
    assert net.decoder.t4_post.expand.factors == (1, 2, 2)
    assert net.encoder.t3.pos_embed.weight.shape == (1, 192, 10 * 28 * 24)
    assert net.encoder.t4.pos_embed.weight.shape == (1, 768, 5 * 7 * 6)


# ----------------------------------------------------------------------------------------------------- blocks
def test_dacb_parameter_count_and_unused_prelu():
    block = DACB(nn.Conv3d, 24, 48)
    # 3 x (DW 27C + C bias, GN 2C, PReLU 1); 1x1 3C->E (+E), PReLU; 1x1 E->C (+C), PReLU; final PReLU; unused PReLU
    c, e = 24, 48
    expected = 3 * (28 * c + 2 * c + 1) + (3 * c * e + e + 1) + (e * c + c + 1) + 1 + 1
    assert sum(p.numel() for p in block.parameters()) == expected
    x = torch.randn(1, c, 6, 6, 6)
    block(x).sum().backward()
    assert block.unused_prelu.weight.grad is None
    assert not block.unused_prelu.weight.requires_grad  # frozen: DDP would fail on a never-used trainable parameter
    with torch.device("meta"):
        net = GLIMS(1, 2)
    unused = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert len(unused) == 16 and all(n.endswith("unused_prelu.weight") for n in unused)  # 8 stages x 2 DACBs


@pytest.mark.parametrize("conv_op, kernel, spatial", [(nn.Conv3d, (3, 3, 3), (9, 10, 7)),
                                                     (nn.Conv3d, (1, 3, 3), (5, 11, 8)),
                                                     (nn.Conv2d, (3, 3), (13, 9))])
@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_cpu_depthwise_conv_path_equals_plain_conv(conv_op, kernel, spatial, dilation):
    torch.manual_seed(0)
    padding = tuple((k - 1) // 2 * dilation for k in kernel)
    conv = conv_op(6, 6, kernel, padding=padding, dilation=dilation, groups=6).double()
    x = torch.randn(2, 6, *spatial, dtype=torch.float64, requires_grad=True)
    ref, out = conv(x), AcceleratedDACB._depthwise(conv, x)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    params = (x, conv.weight, conv.bias)
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("conv_op, spatial", [(nn.Conv3d, (6, 7, 5)), (nn.Conv2d, (12, 10))])
def test_csab_spatial_gate_faithful_is_constant_and_fix_works(conv_op, spatial):
    torch.manual_seed(0)
    x = torch.randn(2, 8, *spatial)
    faithful = CSAB(conv_op, 8)
    faithful(x).square().sum().backward()
    assert faithful.spatial_conv.weight.grad is not None
    assert torch.count_nonzero(faithful.spatial_conv.weight.grad) == 0  # exactly zero: the LN(1) output is its bias
    gate = faithful.spatial_gate(x)
    assert torch.unique(gate).numel() == 1 and torch.allclose(gate, torch.full_like(gate, 0.5))
    assert faithful.mlp[0].weight.grad.abs().sum() > 0  # the channel gate trains

    fixed = CSAB(conv_op, 8, fix_spatial_gate=True)
    fixed(x).square().sum().backward()
    assert fixed.spatial_conv.weight.grad.abs().sum() > 0
    assert torch.unique(fixed.spatial_gate(x)).numel() > 1


@pytest.mark.parametrize("conv_op, spatial", [(nn.Conv3d, (6, 7, 5)), (nn.Conv2d, (12, 10))])
@pytest.mark.parametrize("grad", [True, False])
def test_csab_constant_spatial_gate_shortcut_equals_the_full_computation(conv_op, spatial, grad):
    """The faithful gate computed as sigmoid(PReLU(LayerNorm bias)) without the conv: output, input gradient and every
    parameter gradient (exact zeros, not None, for the conv and the LayerNorm weight) of the full computation."""
    torch.manual_seed(0)
    plain = CSAB(conv_op, 8).double()
    with torch.no_grad():
        plain.spatial_norm.bias.fill_(-0.3)  # negative: the PReLU slope matters
        plain.spatial_act.weight.fill_(-0.4)
    fast = accelerate(copy.deepcopy(plain))[0]
    x = torch.randn(2, 8, *spatial, dtype=torch.float64)
    results = []
    for module in (fast, plain):
        xi = x.clone().requires_grad_(grad)
        calls = []
        hook = module.spatial_conv.register_forward_hook(lambda *a: calls.append(1))
        with torch.set_grad_enabled(grad):
            out = module(xi)
        hook.remove()
        assert len(calls) == (0 if module is fast and grad else 1)  # (the shortcut serves CPU training)
        assert module.spatial_gate(xi).shape == (2, 1, *spatial)
        if grad:
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            results.append([out.detach(), xi.grad] + [p.grad for p in module.parameters()])
        else:
            results.append([out])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if grad:
        assert torch.count_nonzero(fast.spatial_conv.weight.grad) == 0
        assert torch.count_nonzero(fast.spatial_norm.weight.grad) == 0
        assert fast.spatial_norm.bias.grad.abs().sum() > 0 and fast.spatial_act.weight.grad.abs().sum() > 0
    # FLOP counts keep the architecture's conv
    assert count_flops(fast.float(), (2, 8, *spatial)) == count_flops(plain.float(), (2, 8, *spatial)) > 0


def test_spatial_gate_dead_in_full_network_backward():
    torch.manual_seed(0)
    net = GLIMS(1, 2, nn.Conv2d, (64, 64), feature_size=12, deep_supervision=True)
    outputs = net(torch.randn(2, 1, 64, 64))
    sum(o.square().mean() for o in outputs).backward()
    for csab in net.encoder.csab:
        assert torch.count_nonzero(csab.spatial_conv.weight.grad) == 0
    assert net.encoder.t4.layer.blocks[0].attn.relative_position_bias_table.grad.abs().sum() > 0
    assert net.decoder.seg_layers[4].weight.grad.abs().sum() > 0  # the auxiliary head is part of the graph


# ----------------------------------------------------------------------------------------------- window attention
def _monai_style_mask(padded, window, shift):
    """The official mask construction: label regions by nested slice loops (slice(-0, None) spans a whole axis),
    then -100 between tokens of different labels."""
    img = torch.zeros(1, *padded, 1)
    cnt = 0
    slices = [(slice(-w), slice(-w, -s), slice(-s, None)) for w, s in zip(window, shift)]
    for idx in itertools.product(*slices):
        img[(slice(None),) + idx] = cnt
        cnt += 1
    windows = swin.window_partition(img, window).squeeze(-1)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


@pytest.mark.parametrize("padded, window, shift", [((14, 14, 14), (7, 7, 7), (3, 3, 3)),
                                                   ((5, 14, 14), (5, 7, 7), (0, 3, 3)),
                                                   ((14, 21), (7, 7), (3, 3))])
def test_shift_mask_matches_official_construction(padded, window, shift):
    torch.testing.assert_close(swin.compute_shift_mask(padded, window, shift),
                               _monai_style_mask(padded, window, shift))


@pytest.mark.parametrize("window, padded, shifted", [((7, 7, 7), (14, 14, 14), True), ((6, 6, 6), (6, 6, 6), False),
                                                     ((7, 7), (14, 21), True)])
def test_sdpa_window_attention_matches_explicit_softmax(window, padded, shifted):
    torch.manual_seed(0)
    shift = tuple(w // 2 for w in window)
    mask = swin.compute_shift_mask(padded, window, shift) if shifted else None
    nw = mask.shape[0] if shifted else 3
    n, heads = math.prod(window), 3
    q, k, v = (torch.randn(2 * nw, heads, n, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(heads, n, n, dtype=torch.float64, requires_grad=True)
    out = swin.window_attention(q, k, v, bias, mask)
    ref = swin.window_attention_reference(q, k, v, bias, mask)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, bias), grad), torch.autograd.grad(ref, (q, k, v, bias), grad)):
        torch.testing.assert_close(a, b)


def test_window_attention_module_matches_explicit_formula():
    torch.manual_seed(0)
    attn = swin.WindowAttention(48, 3, (7, 7, 7)).double()
    mask = swin.compute_shift_mask((14, 14, 14), (7, 7, 7), (3, 3, 3)).double()
    x = torch.randn(2 * mask.shape[0], 343, 48, dtype=torch.float64, requires_grad=True)
    out = attn(x, (7, 7, 7), mask)
    # explicit official computation with the module's own weights
    b_, n, c = x.shape
    qkv = attn.qkv(x).reshape(b_, n, 3, 3, c // 3).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // 3) ** -0.5, qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[attn.relative_position_index.reshape(-1)].reshape(n, n, -1)
    logits = logits + bias.permute(2, 0, 1).unsqueeze(0)
    logits = logits.view(b_ // mask.shape[0], mask.shape[0], 3, n, n) + mask.unsqueeze(1).unsqueeze(0)
    ref = attn.proj((logits.view(b_, 3, n, n).softmax(-1) @ v).transpose(1, 2).reshape(b_, n, c))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_relative_index_slicing_quirk_kept_by_default():
    official = swin.WindowAttention(24, 3, (7, 7, 7))
    exact = swin.WindowAttention(24, 3, (7, 7, 7), exact_relative_bias=True)
    full = swin.relative_position_index((7, 7, 7))
    assert torch.equal(official._index((6, 6, 6)), full[:216, :216])
    assert not torch.equal(exact._index((6, 6, 6)), full[:216, :216])
    # the exact index of a 6^3 window: token (0,0,0) vs (0,0,1) has offset (0,0,-1) -> same entry as in the 7^3 table
    assert exact._index((6, 6, 6))[0, 1] == full[0, 1]
    assert exact._index((6, 6, 6))[0, 6] == full[0, 7]  # (0,1,0) is token 6 in 6^3 and token 7 in 7^3


def test_window_partition_roundtrip_and_swin_block_padding():
    x = torch.randn(2, 10, 9, 12, 8)
    windows = swin.window_partition(nn.functional.pad(x, (0, 0, 0, 2, 0, 5, 0, 4)), (7, 7, 7))
    assert windows.shape == (2 * 8, 343, 8)
    block = swin.SwinBlock(8, 2, (7, 7, 7), (3, 3, 3))
    layer = swin.SwinLayer(8, 2, 2, (7, 7, 7))
    assert layer(x).shape == x.shape and block(x, None).shape == x.shape
    y = torch.randn(1, 5, 14, 12, 16)
    assert swin.SwinLayer(16, 2, 2, (7, 7, 7))(y).shape == y.shape


def test_patch_merging_legacy_offsets_and_expand():
    x = torch.zeros(1, 2, 2, 2, 1)
    for off in itertools.product(range(2), repeat=3):
        x[(0,) + off + (0,)] = off[0] * 4 + off[1] * 2 + off[2]
    merge = swin.PatchMerging(1, (2, 2, 2))
    parts = torch.cat([x[(slice(None),) + tuple(slice(o, None, 2) for o in off)] for off in merge.offsets], -1)
    codes = parts.flatten().tolist()  # code = 4 d + 2 h + w of the offset
    assert codes == [0, 4, 2, 1, 5, 2, 1, 7]  # offsets (1,1,0) = 6 and (0,1,1) = 3 never used (official legacy merge)
    assert len(set(swin.PatchMerging(1, (2, 2, 2), legacy=False).offsets)) == 8
    assert swin.PatchMerging(4, (2, 2, 2))(torch.randn(2, 6, 6, 6, 4)).shape == (2, 3, 3, 3, 8)
    assert swin.PatchMerging(4, (1, 2, 2))(torch.randn(2, 5, 6, 6, 4)).shape == (2, 5, 3, 3, 8)
    assert swin.PatchExpand(8, (1, 2, 2))(torch.randn(2, 5, 3, 3, 8)).shape == (2, 5, 6, 6, 4)
    expand2d = swin.PatchExpand(8, (2, 2))
    assert expand2d.expand.out_features == 16  # 2D: Linear C -> 2C
    assert expand2d(torch.randn(2, 3, 3, 8)).shape == (2, 6, 6, 4)


# ------------------------------------------------------------------------------------------------------ trainer
def test_build_network_architecture_from_real_plans():
    pm, cm = plan_managers("3d_40x56x40_hippocampus")
    net = nnUNetTrainerGLIMS.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=True)
    assert isinstance(net, GLIMS) and net.decoder.deep_supervision is True
    assert net.patch_size == (40, 56, 40) and net.feature_sizes[-1] == (5, 7, 5)
    assert net.num_parameters() > 40e6  # full-size GLIMS (f = 24)
    pm, cm = plan_managers("2d_48_3pools")  # small enough for a full-width forward on CPU
    inference_net = nnUNetTrainerGLIMS.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    with torch.no_grad():
        out = inference_net(torch.randn(1, 1, 48, 48))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 48, 48)


def _make_trainer(cls):
    return plans_utils.make_trainer(cls, DATASET_JSON)


def test_trainer_optimizer_and_warmup_cosine_schedule(trainer_env):
    trainer = _make_trainer(nnUNetTrainerGLIMS)
    assert trainer.initial_lr == 1e-3 and trainer.weight_decay == 1e-5 and trainer.num_epochs == 1000
    assert trainer.warmup_epochs == 50
    trainer.network = nn.Linear(2, 2)
    optimizer, scheduler = trainer.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 50)  # epoch 0 after construction
    assert optimizer.param_groups[0]["weight_decay"] == 1e-5

    def lr_of(epoch):
        scheduler.step(epoch)  # what nnU-Net's on_train_epoch_start does
        return optimizer.param_groups[0]["lr"]

    assert lr_of(0) == pytest.approx(1e-3 / 50)
    assert lr_of(24) == pytest.approx(1e-3 * 25 / 50)
    assert lr_of(49) == pytest.approx(1e-3)  # end of the linear warm-up
    assert lr_of(50) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_of(525) == pytest.approx(0.5e-3)  # half-way through the cosine
    assert lr_of(999) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 949 / 950)))
    lrs = [lr_of(e) for e in range(1000)]
    assert all(a < b for a, b in zip(lrs[:49], lrs[1:50])) and all(a >= b for a, b in zip(lrs[50:], lrs[51:]))
    # --c resume: a fresh scheduler stepped to the checkpoint epoch gives the same LR as an uninterrupted run
    resumed = WarmupCosineLRScheduler(torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1e-3), 1e-3, 1000, 50)
    resumed.step(700)
    assert resumed.get_last_lr()[0] == pytest.approx(lrs[700])


def test_trainer_variants_and_scales(trainer_env):
    smoke = _make_trainer(nnUNetTrainerGLIMS_smoke)
    assert (smoke.num_epochs, smoke.num_iterations_per_epoch, smoke.num_val_iterations_per_epoch) == (2, 2, 1)
    assert smoke.warmup_epochs == 1 and smoke.initial_lr == 1e-3
    five = _make_trainer(nnUNetTrainerGLIMS_5epochs)
    assert five.num_epochs == 5 and five.warmup_epochs == 1
    five.network = nn.Linear(2, 2)
    optimizer, scheduler = five.configure_optimizers()
    lrs = []
    for epoch in range(5):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:2] == pytest.approx([1e-3, 1e-3])  # one warm-up epoch at the peak, then the cosine
    assert lrs[1] > lrs[2] > lrs[3] > lrs[4] > 0
    scales = smoke._get_deep_supervision_scales()
    assert len(scales) == 5 and list(scales[-1]) == [1 / 16, 1 / 16]


def test_trainers_are_exported():
    import nnunetv2_lgms.trainers as trainers
    expected = {"nnUNetTrainerGLIMS", "nnUNetTrainerGLIMS_1epoch", "nnUNetTrainerGLIMS_5epochs",
                "nnUNetTrainerGLIMS_10epochs", "nnUNetTrainerGLIMS_20epochs", "nnUNetTrainerGLIMS_50epochs",
                "nnUNetTrainerGLIMS_100epochs", "nnUNetTrainerGLIMS_250epochs", "nnUNetTrainerGLIMS_500epochs",
                "nnUNetTrainerGLIMS_smoke", "nnUNetTrainerGLIMS_demo"}
    assert expected <= set(trainers.__all__)
    assert trainers.nnUNetTrainerGLIMS is nnUNetTrainerGLIMS
