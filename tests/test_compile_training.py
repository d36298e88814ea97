"""torch.compile in training (GitHub issue 23, item 2).

* Our trainers take nnU-Net's compile path wherever nnU-Net would: ``_do_i_compile()`` of every trainer of the plugin
  equals stock ``nnUNetTrainer``'s for device cpu / cuda and ``nnUNet_compile`` unset / true-like / false-like
  (constructing a trainer for a CUDA device needs no GPU), and ``initialize()`` on that path wraps our networks in
  ``torch.compile``, compiles the Dice term, and ``set_deep_supervision_enabled`` still reaches the decoder.
* A compiled training step equals the eager one (loss, every gradient, BatchNorm running statistics) for each
  trainer's network, 2D and 3D, deep supervision on, on tiny inputs; marked slow. The ``aot_eager`` backend (Dynamo
  capture, AOTAutograd's functionalised forward and backward, the min-cut partitioner, no code generation) runs with
  the slow tests. The ``inductor`` backend (what nnU-Net uses) generates and compiles about 150 C++ kernels per
  network on the CPU: 6 minutes for LGMSNet 2D on a busy 2-core machine, so it runs only with
  ``NNUNET_LGMS_INDUCTOR_TESTS=1``.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from plans_utils import trainer_plans

import nnunetv2_lgms.trainers as our_trainers
from nnunetv2_lgms.acceleration import is_accelerated, to_reference
from nnunetv2_lgms.acceleration.recompute import undo_recompute
from nnunetv2_lgms.trainers import nnUNetTrainerGLIMS, nnUNetTrainerLGMSNet, nnUNetTrainerLGMSNet_recompute

DATASET_JSON = {"channel_names": {"0": "a"}, "labels": {"background": 0, "one": 1, "two": 2}, "numTraining": 2,
                "file_ending": ".nii.gz"}
CONFIGS = {
    "2d": ((32, 32), [[1, 1]] + [[2, 2]] * 4, [[3, 3]] * 5),
    "3d": ((16, 16, 16), [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4),
    "3d_32": ((32, 32, 32), [[1, 1, 1]] + [[2, 2, 2]] * 4, [[3, 3, 3]] * 5),
}
NETWORKS = {"LGMSNet": nnUNetTrainerLGMSNet, "GLIMS": nnUNetTrainerGLIMS,
            "LGMSNet_recompute": nnUNetTrainerLGMSNet_recompute}
INDUCTOR = os.environ.get("NNUNET_LGMS_INDUCTOR_TESTS", "") not in ("", "0")


def tiny_plans(config: str = "2d") -> dict:
    return trainer_plans(*CONFIGS[config], batch_size=2)


def construct(cls, device: str, config: str = "2d"):
    return cls(tiny_plans(config), "cfg", 0, copy.deepcopy(DATASET_JSON), torch.device(device))


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test of this module on one torch thread."""


# --------------------------------------------------------------------------------------------- the compile path

@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_do_i_compile_matches_stock_nnunet(trainer_env, monkeypatch, device):
    names = our_trainers.__all__
    assert "nnUNetTrainerLGMSNet" in names and "nnUNetTrainerGLIMS" in names
    stock = construct(nnUNetTrainer, device)
    ours = {name: construct(getattr(our_trainers, name), device) for name in names}
    for value in (None, "t", "true", "1", "True", "f", "false", "0", "no"):
        if value is None:
            monkeypatch.delenv("nnUNet_compile", raising=False)
        else:
            monkeypatch.setenv("nnUNet_compile", value)
        expected = stock._do_i_compile()
        assert expected == (device == "cuda" and value in (None, "t", "true", "1", "True"))  # nnU-Net's rule
        differ = [name for name, trainer in ours.items() if trainer._do_i_compile() != expected]
        assert not differ, f"nnUNet_compile={value!r}, device {device}: {differ} disagree with nnUNetTrainer"


@pytest.mark.parametrize("name", NETWORKS)
def test_initialize_on_the_compile_path_compiles_our_network(trainer_env, monkeypatch, name):
    """nnUNetTrainer.initialize where _do_i_compile() is True (as on CUDA): the network is wrapped in
    torch.compile (compiled lazily: nothing is compiled here), the Dice term too, and deep supervision is still
    switched on the decoder behind the wrapper."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as stock_module
    from torch._dynamo.eval_frame import OptimizedModule

    trainer = construct(NETWORKS[name], "cpu")
    monkeypatch.setattr(trainer, "_do_i_compile", lambda: True)
    monkeypatch.setattr(stock_module, "infer_dataset_class", lambda folder: None)  # no preprocessed data here
    trainer.initialize()
    assert isinstance(trainer.network, OptimizedModule)
    assert isinstance(trainer.loss.loss.dc, OptimizedModule)
    inner = trainer.network._orig_mod
    if name == "LGMSNet_recompute":
        from nnunetv2_lgms.acceleration.recompute import recomputed_modules
        assert recomputed_modules(inner)
    for enabled in (False, True):
        trainer.set_deep_supervision_enabled(enabled)
        assert inner.decoder.deep_supervision is enabled


# ---------------------------------------------------------------------------------- compiled step equals eager

def _step(model, net, loss_fn, x, target):
    """Loss, gradients and buffers after one forward/backward of ``model`` (``net`` or its compiled wrapper)."""
    net.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), target)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {n: b.detach().clone() for n, b in net.named_buffers()}


def _compiled_equals_eager(trainer_cls, config: str, backend: str, rtol: float, atol: float):
    trainer = construct(trainer_cls, "cpu", config)
    torch.manual_seed(0)
    net = trainer_cls.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                 trainer.label_manager.num_segmentation_heads, True).train()
    # Under compile the accelerated classes run the reference forward (their paths are for eager CPU training and
    # CUDA-graph inference), so the eager side is the reference network: the comparison isolates the compiler.
    twin = copy.deepcopy(net)
    assert any(is_accelerated(type(m)) for m in twin.modules())
    net = to_reference(undo_recompute(net))
    loss_fn = trainer._build_loss()
    patch = CONFIGS[config][0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, *patch, generator=g)
    seg = torch.randint(0, 3, (2, 1, *patch), generator=g).float()
    target = [torch.nn.functional.interpolate(seg, [round(p * s) for p, s in zip(patch, scale)],
                                              mode="nearest-exact") for scale in trainer._get_deep_supervision_scales()]
    exact = copy.deepcopy(net).double()  # the float64 reference: what float32 round-off is measured against
    _, grads_64, _ = _step(exact, exact, loss_fn, x.double(), [t.double() for t in target])
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend=backend)
    loss_e, grads_e, buffers_e = _step(net, net, loss_fn, x, target)
    loss_c, grads_c, buffers_c = _step(compiled, twin, loss_fn, x, target)
    torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=atol)
    # a head whose deep-supervision weight is 0 gets no gradient in eager (nnU-Net skips its loss term) and a zero
    # one from AOTAutograd (its output's cotangent is materialised as zeros)
    assert grads_e.keys() <= grads_c.keys()
    for name in grads_c.keys() - grads_e.keys():
        assert not grads_c[name].any(), name
    # Gradients: within rtol/atol of eager, or, where eager's own float32 round-off is larger (GLIMS at these tiny
    # patches normalises over one or two voxels at the bottleneck, and its stem's gradient carries ~1 % of
    # round-off in eager already), no further from the float64 gradient than 4x eager's distance.
    scale = max(float(g.abs().max()) for g in grads_e.values())
    for name, g in grads_e.items():
        if torch.allclose(grads_c[name], g, rtol=rtol, atol=atol * scale):
            continue
        err_eager = float((g.double() - grads_64[name]).abs().max())
        err_compiled = float((grads_c[name].double() - grads_64[name]).abs().max())
        assert err_compiled <= 4 * err_eager + atol * scale, \
            f"{name}: compiled {err_compiled:.3g} from float64, eager {err_eager:.3g}"
    for name, b in buffers_e.items():
        torch.testing.assert_close(buffers_c[name], b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# GLIMS in 3D at 32^3: at 16^3 its bottleneck normalises over single voxels, and the stem's float32 gradient is then
# round-off-dominated (inductor 1 % of the largest gradient from float64, eager 0.1 %)
CASES = [("LGMSNet", "2d"), ("LGMSNet", "3d"), ("GLIMS", "2d"), ("GLIMS", "3d_32"), ("LGMSNet_recompute", "2d")]


@pytest.mark.slow
@pytest.mark.parametrize("name,config", CASES)
def test_compiled_training_step_equals_eager_aot_eager(trainer_env, name, config):
    _compiled_equals_eager(NETWORKS[name], config, "aot_eager", rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not INDUCTOR, reason="inductor compiles ~150 C++ kernels per network on CPU (minutes); "
                                         "set NNUNET_LGMS_INDUCTOR_TESTS=1")
@pytest.mark.parametrize("name,config", CASES)
def test_compiled_training_step_equals_eager_inductor(trainer_env, name, config):
    # inductor's fused float32 kernels: GLIMS-3D's gradients up to ~2e-3 of the largest one from float64, where
    # eager's are at ~1e-4 (LGMSNet: within 1e-4 of eager)
    _compiled_equals_eager(NETWORKS[name], config, "inductor", rtol=1e-3, atol=5e-3)
