"""DDP safety of the trainers' networks (GitHub issue 23, item 1).

nnU-Net trains on several GPUs with ``DistributedDataParallel(network, device_ids=[rank])``: no
``find_unused_parameters``, so every parameter that requires a gradient must get one in every step, or DDP stops
at the next step. Its loss under DDP without compile weights the lowest deep-supervision output 1e-6 instead of 0
for that reason (``nnUNetTrainer._build_loss``).

* :func:`test_every_trainable_parameter_gets_a_finite_gradient`: one step of nnU-Net's loss as built under DDP
  gives every parameter with ``requires_grad`` a finite gradient, for each trainer's network (built by its
  ``build_network_architecture`` from a hand-written plan), 2D, 3D isotropic and 3D anisotropic, deep supervision
  on and off (off: the heads only deep supervision uses must be frozen).
* :func:`test_two_process_ddp_equals_one_process`: two ``gloo`` processes on the CPU, each with the same full batch,
  wrapped as nnU-Net wraps (``DistributedDataParallel`` without ``find_unused_parameters``), with the loss
  (all-gathered batch Dice) and optimiser each trainer builds under DDP, take two steps in float64. Both losses,
  the averaged gradients of the first step, and every parameter and buffer (BatchNorm running statistics included)
  after it equal those of one process. Two steps, because DDP reports a parameter without gradient at the start of
  the next one; the state is compared after the first, because at these tiny patches GLIMS's gradient norm is far
  above nnU-Net's clip at 12 and ill-conditioned (normalisations over one or two voxels at the bottleneck), so the
  second clip carries rounding differences into every weight.

Not covered on the CPU: ``SyncBatchNorm.convert_sync_batchnorm``, which nnU-Net applies before wrapping, runs on CUDA
only, so here each process normalises its own copy of the batch (with identical copies the batch statistics are the
same; SyncBatchNorm would pool 2x the samples, which changes the unbiased running variance by a factor
(2n-1)/(2n-2) per step, n samples per process).
"""
from __future__ import annotations

import copy
import datetime
import os
import time
from pathlib import Path

import pytest
import torch

from plans_utils import trainer_plans

from nnunetv2_lgms.trainers import nnUNetTrainerGLIMS, nnUNetTrainerLGMSNet

TRAINERS = {"LGMSNet": nnUNetTrainerLGMSNet, "GLIMS": nnUNetTrainerGLIMS}
# name: (patch, strides, kernels); small patches, nnU-Net's plan shapes
CONFIGS = {
    "2d": ((32, 32), [[1, 1]] + [[2, 2]] * 4, [[3, 3]] * 5),
    "3d": ((16, 16, 16), [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4),
    "3d_aniso": ((8, 32, 32), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                 [[1, 3, 3]] + [[3, 3, 3]] * 4),
}
DATASET_JSON = {"channel_names": {"0": "a", "1": "b"}, "labels": {"background": 0, "one": 1, "two": 2},
                "numTraining": 2, "file_ending": ".nii.gz"}
BATCH = 2
DDP_CASES = [(name, config, ds) for ds in (True, False) for name in TRAINERS for config in ("2d", "3d")]


def case_id(name, config, ds) -> str:
    return f"{name}-{config}-ds_{'on' if ds else 'off'}"


def tiny_plans(config: str) -> dict:
    return trainer_plans(*CONFIGS[config], batch_size=BATCH)


def make_trainer(name: str, config: str, ds: bool):
    """The trainer as ``nnUNetv2_train`` constructs it (CPU; under an initialised process group it is a DDP
    trainer), deep supervision as nnUNetTrainerNoDeepSupervision sets it when off, and its network."""
    trainer = TRAINERS[name](tiny_plans(config), "cfg", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    trainer.enable_deep_supervision = ds
    net = TRAINERS[name].build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                    len(DATASET_JSON["channel_names"]),
                                                    trainer.label_manager.num_segmentation_heads, ds)
    return trainer, net.train()


def single_process_loss(trainer):
    """nnU-Net's loss exactly as ``_build_loss`` builds it under DDP without compile (lowest deep-supervision weight
    1e-6), computed in this one process (no all-gather of the Dice terms)."""
    trainer.is_ddp = True
    try:
        loss = trainer._build_loss()
    finally:
        trainer.is_ddp = False
    for module in loss.modules():
        if hasattr(module, "ddp"):
            module.ddp = False
    return loss


def make_batch(trainer, config: str, seed: int = 0):
    """Image and targets (one per deep-supervision output, nearest-exact as nnU-Net downsamples them)."""
    patch = CONFIGS[config][0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, len(DATASET_JSON["channel_names"]), *patch, generator=g)
    seg = torch.randint(0, len(DATASET_JSON["labels"]), (BATCH, 1, *patch), generator=g).float()
    scales = trainer._get_deep_supervision_scales() if trainer.enable_deep_supervision else None
    if scales is None:
        return x, seg
    return x, [torch.nn.functional.interpolate(seg, [round(p * s) for p, s in zip(patch, scale)],
                                               mode="nearest-exact") for scale in scales]


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test of this module on one torch thread."""


@pytest.mark.parametrize("ds", [True, False], ids=["ds_on", "ds_off"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainable_parameter_gets_a_finite_gradient(trainer_env, name, config, ds):
    torch.manual_seed(0)
    trainer, net = make_trainer(name, config, ds)
    x, target = make_batch(trainer, config)
    loss = single_process_loss(trainer)(net(x), target)
    loss.backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert trainable
    without = [n for n, p in trainable if p.grad is None]
    assert not without, f"{len(without)} trainable parameters get no gradient (DDP would fail): {without}"
    non_finite = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not non_finite, non_finite
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)


# ------------------------------------------------------------------------------------------- two processes, gloo

def _two_steps(trainer, net, model, loss_fn, x, target) -> dict:
    """Two nnU-Net training steps (zero_grad, forward, loss, backward, clip at 12, optimiser step) of ``model``
    (``net`` or its DDP wrapper) with the trainer's optimiser; the losses, the first step's gradients, and the
    parameters and buffers after the first step (the second step's loss shows it ran on the same weights)."""
    trainer.network = model
    optimizer, _ = trainer.configure_optimizers()
    losses, grads = [], None
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        if step == 0:
            grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in net.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step == 0:
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return {"losses": losses, "grads": grads, "state": state}


def _ddp_worker(rank: int, world_size: int, init_method: str, folder: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ["nnUNet_compile"] = "f"  # eager DDP: the loss's 1e-6 weight and no compiled Dice
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for name, config, ds in DDP_CASES:
            inputs = torch.load(Path(folder) / f"{case_id(name, config, ds)}.in.pt")
            try:
                trainer, net = make_trainer(name, config, ds)
                net.double()
                assert trainer.is_ddp
                net.load_state_dict(inputs["state"])
                # as nnUNetTrainer.initialize wraps it (SyncBatchNorm conversion left out: CUDA only)
                model = DDP(net)
                result = _two_steps(trainer, net, model, trainer._build_loss(), inputs["x"], inputs["target"])
            except Exception as e:  # recorded per case; the test of that case fails with it
                result = {"error": f"{type(e).__name__}: {e}"}
            if rank == 0:
                torch.save(result, Path(folder) / f"{case_id(name, config, ds)}.ddp.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Runs every case of :data:`DDP_CASES` in one two-process job and in this process; per case (ddp, single)."""
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("ddp")
    env = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (folder / var).mkdir()
        env[var] = os.environ.get(var)
        os.environ[var] = str(folder / var)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {}
        for name, config, ds in DDP_CASES:
            torch.manual_seed(0)
            trainer, net = make_trainer(name, config, ds)
            net.double()
            x, target = make_batch(trainer, config)
            x, target = x.double(), ([t.double() for t in target] if isinstance(target, list) else target.double())
            state = copy.deepcopy(net.state_dict())
            torch.save({"state": state, "x": x, "target": target}, folder / f"{case_id(name, config, ds)}.in.pt")
            single[case_id(name, config, ds)] = _two_steps(trainer, net, net, single_process_loss(trainer), x,
                                                           target)
            single[case_id(name, config, ds)]["initial"] = state
        context = mp.spawn(_ddp_worker, args=(2, f"file://{folder / 'rendezvous'}", str(folder)), nprocs=2,
                           join=False)
        deadline = time.monotonic() + 900
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail("the two-process DDP job did not finish within 900 s")
    finally:
        torch.set_num_threads(threads)
        for var, value in env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    return {key: (torch.load(folder / f"{key}.ddp.pt"), ref) for key, ref in single.items()}


@pytest.mark.parametrize("case", [case_id(*c) for c in DDP_CASES])
def test_two_process_ddp_equals_one_process(ddp_results, case):
    ddp, single = ddp_results[case]
    assert "error" not in ddp, ddp.get("error")
    # the all-gathered batch Dice sums twice the counts, while its smoothing term (1e-5) stays: ~1e-8 relative
    torch.testing.assert_close(torch.tensor(ddp["losses"], dtype=torch.float64),
                               torch.tensor(single["losses"], dtype=torch.float64), rtol=1e-6, atol=0)
    assert ddp["grads"].keys() == single["grads"].keys()
    # absolute tolerance relative to the largest gradient entry of the network: gradients that are zero in exact
    # arithmetic (conv biases before a normalisation) come out as rounding noise of either sign in both runs
    scale = max(float(g.abs().max()) for g in single["grads"].values() if g is not None)
    for name, g in single["grads"].items():
        if g is None:
            assert ddp["grads"][name] is None, name
            continue
        torch.testing.assert_close(ddp["grads"][name], g, rtol=1e-6, atol=1e-8 * scale,
                                   msg=lambda m: f"{name} (largest gradient entry {scale:.3g}): {m}")
    assert ddp["state"].keys() == single["state"].keys()
    # parameters and buffers after the first step (clipped at 12 as nnU-Net clips), against the largest change.
    # GLIMS has gradients that are zero or ill-conditioned in exact arithmetic (behind the constant CSAB spatial gate,
    # see docs/deviations.md; before normalisations over one or two voxels at the bottleneck of these tiny patches)
    # that come out as rounding noise; with its gradient norm far above the clip, the momentum
    # step turns that noise into updates of up to ~1 % of the largest one, differently in each run.
    initial = single["initial"]
    moved = max(float((value - initial[name]).abs().max()) for name, value in single["state"].items()
                if value.is_floating_point())
    for name, value in single["state"].items():
        if not value.is_floating_point():
            assert torch.equal(ddp["state"][name], value), name
            continue
        torch.testing.assert_close(ddp["state"][name] - initial[name], value - initial[name], rtol=1e-5,
                                   atol=2e-2 * moved, msg=lambda m: f"{name} (largest change {moved:.3g}): {m}")
