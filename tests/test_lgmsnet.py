"""LGMSNet: exact parameter counts, FLOPs, nnU-Net's deep-supervision contract on real plan shapes, and the sparse
attention path against an explicit reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nnunetv2_lgms.flops import count_flops
from nnunetv2_lgms.networks.lgms_blocks import GlobalMultiscaleBlock, LocalMultiscaleBlock
from nnunetv2_lgms.networks.lgmsnet import LGMSNet, lgmsnet_strides
from nnunetv2_lgms.networks.attention import (MultiHeadSelfAttention, from_sparse_tokens, sparse_patch_size,
                                                     to_sparse_tokens)
from nnunetv2_lgms.trainers import nnUNetTrainerLGMSNet

from plans_utils import PLANS, managers

torch.manual_seed(0)


# ---------------------------------------------------------------- parameter counts and FLOPs (spec §4)

def test_2d_paper_configuration_parameter_count_is_exact():
    net = LGMSNet(3, 1, nn.Conv2d)
    assert net.num_parameters() == 2_321_393
    # the three auxiliary deep-supervision heads (16->1 is the main head) are the only extra parameters
    assert net.num_parameters(include_auxiliary_heads=True) == 2_321_393 + (32 + 1) + (64 + 1) + (128 + 1)


def test_3d_official_configuration_parameter_count_is_exact():
    assert LGMSNet(1, 14, nn.Conv3d).num_parameters() == 6_193_742


def test_block_parameter_counts_match_the_official_modules():
    assert sum(p.numel() for p in LocalMultiscaleBlock(nn.Conv2d, 16, nn.BatchNorm2d).parameters()) == 1_384
    gms = GlobalMultiscaleBlock(nn.Conv2d, 64, 128, 96, 256, nn.BatchNorm2d)
    assert sum(p.numel() for p in gms.parameters()) == 391_424
    assert sum(p.numel() for p in gms.transformer.parameters()) == 62_272


def test_2d_flops_match_the_reference_count():
    # 10.01 GFLOPs = 5.01 GMACs with FlopCounterMode on the official code (attention included)
    assert count_flops(LGMSNet(3, 1, nn.Conv2d), (1, 3, 256, 256)) / 1e9 == pytest.approx(10.011, abs=0.005)


def test_channel_counts_not_divisible_by_four_are_rejected():
    with pytest.raises(ValueError, match="multiples of 4"):
        LGMSNet(1, 2, features_per_stage=(18, 32, 64, 128, 128))


# ---------------------------------------------------------------- nnU-Net contract on real plan shapes

def _expected_sizes(patch, scales):
    return [tuple(int(round(p * s)) for p, s in zip(patch, scale)) for scale in scales]


def _trainer_scales(cm):
    trainer = object.__new__(nnUNetTrainerLGMSNet)  # only the attributes _get_deep_supervision_scales reads
    trainer.configuration_manager, trainer.enable_deep_supervision = cm, True
    return trainer._get_deep_supervision_scales()


@pytest.mark.parametrize("plan", ["2d_256", "2d_512x448", "2d_48_3pools", "3d_40x56x40_hippocampus"])
def test_deep_supervision_outputs_match_trainer_scales_real_forward(plan):
    plans, cm = managers(plan)
    net = nnUNetTrainerLGMSNet.build_network_architecture(plans, cm, 2, 3, enable_deep_supervision=True)
    patch = tuple(cm.patch_size)
    x = torch.randn(1, 2, *patch)
    with torch.no_grad():
        outputs = net(x)
    scales = _trainer_scales(cm)
    assert isinstance(outputs, list) and len(outputs) == len(scales) == 4
    assert [tuple(o.shape[2:]) for o in outputs] == _expected_sizes(patch, scales)
    assert all(o.shape[:2] == (1, 3) for o in outputs)
    assert scales[0] == [1.0] * len(patch)  # full resolution first

    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
    with torch.no_grad():
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (1, 3, *patch)
    assert torch.allclose(single, outputs[0], atol=1e-5)


@pytest.mark.parametrize("plan", ["3d_128", "3d_40x224x192_aniso"])
def test_deep_supervision_outputs_large_3d_plans(plan):
    # full-size 3D patches: shapes propagated on the meta device (no compute); the scaled-down real forward of the
    # same strides is covered by test_anisotropic_plan_real_forward
    plans, cm = managers(plan)
    with torch.device("meta"):
        net = nnUNetTrainerLGMSNet.build_network_architecture(plans, cm, 1, 3, enable_deep_supervision=True)
        outputs = net(torch.empty(2, 1, *cm.patch_size))
        net.decoder.deep_supervision = False
        single = net(torch.empty(2, 1, *cm.patch_size))
    scales = _trainer_scales(cm)
    assert len(outputs) == len(scales) == 4
    assert [tuple(o.shape[2:]) for o in outputs] == _expected_sizes(cm.patch_size, scales)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (2, 3, *cm.patch_size)


def test_anisotropic_plan_real_forward_and_kernels():
    _, strides, kernels = PLANS["3d_40x224x192_aniso"]
    net = LGMSNet.from_plan((20, 56, 48), strides, kernels, 1, 2, deep_supervision=True)
    lms = net.encoder.stages[0][0]
    assert [tuple(c.kernel_size) for c in lms.depthwise] == [(1, 3, 3), (1, 5, 5), (1, 7, 7), (1, 9, 9)]
    assert tuple(net.encoder.stages[3].merge[0].kernel_size) == (3, 3, 3)
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, 20, 56, 48))
    # first pool (1,2,2), then (2,2,2) x3: bottom map (2, 3.5->3, ...) would be odd; here (20,56,48)/(8,16,16)
    assert [tuple(o.shape[2:]) for o in outputs] == [(20, 56, 48), (20, 28, 24), (10, 14, 12), (5, 7, 6)]
    assert all(torch.isfinite(o).all() for o in outputs)


def test_odd_bottom_maps_get_a_per_axis_sparse_stride():
    assert sparse_patch_size((5, 14, 12), (2, 2, 2)) == (1, 2, 2)
    assert sparse_patch_size((5, 7, 6), (2, 2, 2)) == (1, 1, 2)
    net = LGMSNet(1, 2, nn.Conv3d, strides=[(1, 1, 1)] + [(2, 2, 2)] * 4)
    with torch.no_grad():  # 80x112x96 / 16 = 5x7x6 at the bottleneck
        assert net(torch.randn(1, 1, 80, 112, 96)).shape == (1, 2, 80, 112, 96)


def test_plans_with_more_stages_use_the_first_four_pools_and_fewer_are_padded():
    assert lgmsnet_strides([[1, 1]] + [[2, 2]] * 6, 2) == [(1, 1)] + [(2, 2)] * 4
    assert lgmsnet_strides([[1, 1, 1], [2, 2, 2]], 3) == [(1, 1, 1), (2, 2, 2)] + [(1, 1, 1)] * 3
    with pytest.raises(ValueError, match="first stride"):
        lgmsnet_strides([[2, 2], [2, 2]], 2)


def test_any_input_channels_and_region_outputs():
    net = LGMSNet.from_plan((64, 64), [[1, 1]] + [[2, 2]] * 4, [[3, 3]] * 5, 5, 3, deep_supervision=False)
    assert net(torch.randn(2, 5, 64, 64)).shape == (2, 3, 64, 64)


def test_gradients_reach_every_parameter_with_deep_supervision():
    net = LGMSNet.from_plan((64, 64), [[1, 1]] + [[2, 2]] * 4, [[3, 3]] * 5, 1, 2, deep_supervision=True)
    sum(o.float().pow(2).mean() for o in net(torch.randn(2, 1, 64, 64))).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_trainer_wires_the_deep_supervision_loss_to_every_output(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    plans, _ = managers("2d_48_3pools", configuration="2d")
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2},
                    "numTraining": 2, "file_ending": ".png"}
    trainer = nnUNetTrainerLGMSNet(dict(plans.plans, continue_training=False), "2d", 0, dataset_json,
                                   torch.device("cpu"))
    # the two steps of trainer.initialize() that matter here (the rest needs preprocessed data)
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                         trainer.label_manager.num_segmentation_heads, True)
    trainer.loss = trainer._build_loss()
    outputs = trainer.network(torch.randn(2, 1, 48, 48))
    scales = trainer._get_deep_supervision_scales()
    weights = trainer.loss.weight_factors
    assert len(outputs) == len(scales) == len(weights) == 4
    assert weights[-1] == 0 and weights[0] > weights[1] > weights[2] > 0  # nnU-Net: lowest resolution unweighted
    targets = [torch.randint(0, 3, (2, 1, *o.shape[2:])).float() for o in outputs]
    loss = trainer.loss(outputs, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert trainer.network.decoder.seg_layers[2].weight.grad.abs().sum() > 0  # 1/4-scale head trains


# ---------------------------------------------------------------- sparse attention

def test_sparse_tokens_are_strided_subgrids_and_invertible():
    x = torch.randn(2, 3, 6, 8)
    tokens = to_sparse_tokens(x, (2, 2))
    assert tokens.shape == (2 * 4, 12, 3)
    # sequence (b=1, ph=1, pw=0), token (h=2, w=3) is pixel (2*2+1, 3*2+0)
    assert torch.equal(tokens[1 * 4 + 1 * 2 + 0, 2 * 4 + 3], x[1, :, 5, 6])
    assert torch.equal(from_sparse_tokens(tokens, (6, 8), (2, 2)), x)
    x3 = torch.randn(1, 4, 5, 6, 4)
    p = sparse_patch_size(x3.shape[2:], (2, 2, 2))
    assert torch.equal(from_sparse_tokens(to_sparse_tokens(x3, p), x3.shape[2:], p), x3)
    # channels-last maps (the CPU training layout) give the same tokens
    for fmt, y in ((torch.channels_last, x), (torch.channels_last_3d, torch.randn(2, 3, 4, 6, 8))):
        q = sparse_patch_size(y.shape[2:], (2,) * (y.ndim - 2))
        assert torch.equal(to_sparse_tokens(y.contiguous(memory_format=fmt), q), to_sparse_tokens(y, q))


def test_sdpa_attention_equals_explicit_softmax_forward_and_backward():
    attn = MultiHeadSelfAttention(dim=48, heads=4, head_dim=8).double()
    x = torch.randn(3, 50, 48, dtype=torch.double, requires_grad=True)

    def reference(t):
        n, length, _ = t.shape
        q, k, v = attn.to_qkv(t).chunk(3, dim=-1)
        q, k, v = (z.view(n, length, 4, 8).transpose(1, 2) for z in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1)
        return attn.to_out((weights @ v).transpose(1, 2).reshape(n, length, 32))

    out, ref = attn(x), reference(x)
    assert torch.allclose(out, ref, atol=1e-10)
    g_out = torch.autograd.grad(out.sum(), [x, *attn.parameters()])
    g_ref = torch.autograd.grad(ref.sum(), [x, *attn.parameters()])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g_out, g_ref))


def test_lowres_and_cascade_configurations_build_with_their_input_channels():
    import copy

    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from plans_utils import configuration_dict, plans_dict

    plans = plans_dict("3d_40x56x40_hippocampus", "3d_fullres")
    plans["configurations"]["3d_lowres"] = dict(configuration_dict((24, 32, 24), [[1, 1, 1]] + [[2, 2, 2]] * 2,
                                                                   [[3, 3, 3]] * 3), next_stage="3d_cascade_fullres")
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    pm = PlansManager(copy.deepcopy(plans))
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "anterior": 1, "posterior": 2}}
    for configuration, channels in (("3d_lowres", 1), ("3d_cascade_fullres", 3)):
        cm = pm.get_configuration(configuration)
        assert determine_num_input_channels(pm, cm, dataset_json) == channels
        net = nnUNetTrainerLGMSNet.build_network_architecture(pm, cm, channels, 3, enable_deep_supervision=False)
        with torch.no_grad():
            assert net(torch.randn(1, channels, *cm.patch_size)).shape == (1, 3, *cm.patch_size)
