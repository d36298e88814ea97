"""``nnunetv2_lgms.acceleration.recompute`` and ``nnUNetTrainerLGMSNet_recompute``: recomputing LGMSNet's blocks in
the backward changes neither the results (loss, every gradient, BatchNorm running statistics after a training step)
nor the state dict, keeps fewer activations for the backward, and leaves evaluation untouched."""
from __future__ import annotations

import copy

import pytest
import torch

from plans_utils import trainer_plans

from nnunetv2_lgms.acceleration.recompute import (DEFAULT_LEVELS, is_recomputing, level_modules, recompute,
                                                  recomputed_modules, undo_recompute)
from nnunetv2_lgms.trainers import nnUNetTrainerLGMSNet, nnUNetTrainerLGMSNet_recompute

CONFIGS = {
    "2d": ((64, 64), [[1, 1]] + [[2, 2]] * 4, [[3, 3]] * 5),
    "3d_aniso": ((8, 32, 32), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                 [[1, 3, 3]] + [[3, 3, 3]] * 4),
}
DATASET_JSON = {"channel_names": {"0": "a", "1": "b"}, "labels": {"background": 0, "one": 1, "two": 2},
                "numTraining": 2, "file_ending": ".nii.gz"}


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test of this module on one torch thread."""


def build_pair(config: str, ds: bool = True):
    """(trainer, plain network, recomputing network with the plain one's weights), both through the trainers'
    ``build_network_architecture``."""
    plans = trainer_plans(*CONFIGS[config], batch_size=2)
    trainer = nnUNetTrainerLGMSNet(plans, "cfg", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    args = (trainer.plans_manager, trainer.configuration_manager, 2, 3, ds)
    torch.manual_seed(0)
    plain = nnUNetTrainerLGMSNet.build_network_architecture(*args).train()
    recomputing = nnUNetTrainerLGMSNet_recompute.build_network_architecture(*args).train()
    assert list(recomputing.state_dict()) == list(plain.state_dict())
    recomputing.load_state_dict(plain.state_dict())
    return trainer, plain, recomputing


def training_step(trainer, net, x, seg):
    """nnU-Net's loss on one forward/backward; (loss, gradients, buffers, bytes autograd kept for the backward,
    names of the modules that were running when a tensor was kept)."""
    kept, savers, stack = {}, set(), []
    names = {m: n for n, m in net.named_modules()}

    def pack(t):
        kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if stack:
            savers.add(stack[-1])
        return t

    def push(module, args):
        if module in names:
            stack.append(names[module])

    def pop(module, args, out):
        if module in names:
            stack.pop()

    loss_fn = trainer._build_loss()
    target = [torch.nn.functional.interpolate(seg, [round(p * s) for p, s in zip(seg.shape[2:], scale)],
                                              mode="nearest-exact") for scale in trainer._get_deep_supervision_scales()]
    net.zero_grad(set_to_none=True)
    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(push),
             torch.nn.modules.module.register_module_forward_hook(pop)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(net(x), target)
    finally:
        for hook in hooks:
            hook.remove()
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    return (loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
            {n: b.clone() for n, b in net.named_buffers()}, sum(v for k, v in kept.items() if k not in params),
            savers)


@pytest.mark.parametrize("config", CONFIGS)
def test_recomputed_training_step_equals_plain_one(trainer_env, config):
    trainer, plain, recomputing = build_pair(config)
    regions = recomputed_modules(recomputing)
    assert sorted(regions) == sorted(level_modules(recomputing, DEFAULT_LEVELS))
    assert any(n.startswith("encoder.stem") for n in regions) and any(n.startswith("decoder.stages.2") for n in regions)
    assert not recomputed_modules(plain)
    g = torch.Generator().manual_seed(0)
    patch = CONFIGS[config][0]
    x = torch.randn(2, 2, *patch, generator=g)
    seg = torch.randint(0, 3, (2, 1, *patch), generator=g).float()
    for _ in range(2):  # BatchNorm statistics must move once per step, not once per forward run
        loss_p, grads_p, buffers_p, kept_p, _ = training_step(trainer, plain, x, seg)
        loss_r, grads_r, buffers_r, kept_r, savers = training_step(trainer, recomputing, x, seg)
        torch.testing.assert_close(loss_r, loss_p, rtol=1e-6, atol=1e-7)
        assert grads_r.keys() == grads_p.keys() and len(grads_p) > 100  # (the head weighted 0 gets none)
        for name, grad in grads_p.items():
            torch.testing.assert_close(grads_r[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
        for name, buffer in buffers_p.items():
            torch.testing.assert_close(buffers_r[name], buffer, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # a recomputed block keeps its inputs (saved while the block itself runs), nothing of what its layers compute,
    # however the parent runs it (the CPU training path's decoder calls FusionConv.forward_parts, and runs the
    # layers of a plain nn.Sequential one by one)
    inside = sorted(s for s in savers for r in regions if s.startswith(r + "."))
    assert not inside, f"tensors kept inside recomputed blocks: {inside}"
    assert kept_r < 0.5 * kept_p, (kept_r, kept_p)


def test_evaluation_and_state_dict_are_untouched(trainer_env):
    trainer, plain, recomputing = build_pair("2d", ds=False)
    x = torch.randn(2, 2, 64, 64)
    for net in (plain, recomputing):
        net.eval()
    with torch.no_grad():
        torch.testing.assert_close(recomputing(x), plain(x), rtol=0, atol=0)
    reloaded = nnUNetTrainerLGMSNet.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                               2, 3, False)
    reloaded.load_state_dict(recomputing.state_dict())  # strict: a checkpoint of either loads into the other


def test_recompute_is_idempotent_and_undoable(trainer_env):
    _, plain, _ = build_pair("2d")
    types = {n: type(m) for n, m in plain.named_modules()}
    recompute(plain)
    recompute(plain)
    names = recomputed_modules(plain)
    assert names and all(not is_recomputing(type(m).__mro__[1]) for n, m in plain.named_modules() if n in names)
    assert all(isinstance(m, types[n]) for n, m in plain.named_modules())
    undo_recompute(plain)
    assert {n: type(m) for n, m in plain.named_modules()} == types
    with pytest.raises(KeyError):
        recompute(plain, modules=["encoder.no_such_block"])
    with pytest.raises(TypeError):
        recompute(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)))
