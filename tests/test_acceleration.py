"""The reference networks and the acceleration attached to them.

* ``networks/`` is the plain reference: it imports nothing else of the package and branches on no device, autograd,
  compile, autocast or FLOP-counting state.
* Every registered accelerated class (:func:`nnunetv2_lgms.acceleration.registered`) has an equality case (forward,
  and backward where it serves training, against its reference class) and a case where it declines and runs
  exactly the reference's ops; a class without both fails :func:`test_every_registered_class_has_its_cases`.
* ``accelerate`` keeps parameters and state-dict keys, reports what it swapped, and is one setting (argument or
  environment variable) away from the plain reference.
"""
from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from nnunetv2_lgms import acceleration
from nnunetv2_lgms.acceleration import (ENV_VAR, accelerate, accelerated_modules, reference_copy, registered,
                                        resolve_settings, to_reference)
from nnunetv2_lgms.acceleration import cpu_training, cuda_graphs, runtime
from nnunetv2_lgms.networks import attention, common, glims_blocks, lgms_blocks
from nnunetv2_lgms.networks.glims import GLIMS
from nnunetv2_lgms.networks.lgmsnet import LGMSNet

NETWORKS_DIR = Path(acceleration.__file__).resolve().parents[1] / "networks"
CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------- networks/ is plain
def test_networks_import_nothing_else_of_the_package():
    for path in NETWORKS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith("nnunetv2_lgms") or name.startswith("nnunetv2_lgms.networks"), \
                    f"{path.name} imports {name}"


FORBIDDEN = ["is_grad_enabled", "is_compiling", "is_autocast_enabled", "_dynamo", "counting_flops", "device.type",
             "is_cuda", "inference_mode", "no_grad", "channels_last", "mkldnn", "torch.ops", "is_scripting",
             "is_tracing", "FlopCounter", "cuda."]


def test_networks_hold_no_branch_on_device_autograd_compile_autocast_or_flop_counting():
    for path in NETWORKS_DIR.glob("*.py"):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        for token in FORBIDDEN:
            assert token not in code, f"{path.name} mentions {token}"
        # requires_grad appears only to freeze a parameter at construction
        assert all(m == "requires_grad_(False)" for m in re.findall(r"requires_grad\w*\([^)]*\)|requires_grad\b",
                                                                       code)), path.name


def test_networks_folder_is_at_most_1800_lines():
    assert sum(len(p.read_text().splitlines()) for p in NETWORKS_DIR.glob("*.py")) <= 1800


# ------------------------------------------------------------------------------------------------ the cases
@dataclass
class Case:
    """An accelerated class's module (built as its reference), its inputs and how to call it."""
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.dtype], Sequence[torch.Tensor]]
    call: Callable = lambda m, *a: m(*a)
    call_reference: Optional[Callable] = None  # where the accelerated module offers a method the reference lacks
    backward: bool = True
    eval_mode: bool = False
    dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32)
    device: str = "cpu"
    settings: Sequence[str] = ("cpu_training",)
    #: float32: the largest error allowed against the float64 reference, as a fraction of the largest magnitude,
    #: where another engine computes (None: as close as the reference's own float32 result, see the test)
    float32_tolerance: Optional[float] = None


def _x(*shape, layout=None):
    def make(dtype):
        x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
        return [x.contiguous(memory_format=layout) if layout is not None else x]
    return make


def _small_lgmsnet(dim=2, ds=True):
    if dim == 2:
        return LGMSNet(3, 2, nn.Conv2d, features_per_stage=(8, 8, 16, 16, 16), deep_supervision=ds)
    return LGMSNet(1, 2, nn.Conv3d, strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)],
                   kernel_sizes=[(1, 3, 3)] + [(3, 3, 3)] * 4, features_per_stage=(8, 8, 16, 16, 16),
                   deep_supervision=ds)


def _small_glims(dim=3, ds=True):
    if dim == 2:
        return GLIMS(3, 2, nn.Conv2d, patch_size=(64, 64), feature_size=12, depths=(2, 2, 2, 2),
                     deep_supervision=ds)
    return GLIMS(1, 2, nn.Conv3d, patch_size=(8, 32, 32),
                 strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 1, 1)],
                 kernel_sizes=[(1, 3, 3)] + [(3, 3, 3)] * 5, feature_size=12, depths=(2, 2, 2, 2),
                 deep_supervision=ds)


def _skips_of(net_builder, shape):
    """Inputs of a decoder: the encoder's outputs for a fixed input (leaves, so gradients reach them)."""
    def make(dtype):
        torch.manual_seed(0)
        net = net_builder().to(dtype)
        with torch.no_grad():
            out = net.encoder(torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(1)))
        flat = list(out[0]) + [out[1]] if isinstance(out, tuple) else list(out)  # (GLIMS: skips, bottleneck)
        return [t.detach().clone() for t in flat]
    return make


CL, CL3 = torch.channels_last, torch.channels_last_3d
CASES = {
    cpu_training.InstanceNorm2d: [Case("contiguous", lambda: nn.InstanceNorm2d(6, affine=True), _x(2, 6, 9, 10)),
                                  Case("channels-last", lambda: nn.InstanceNorm2d(6), _x(2, 6, 9, 10, layout=CL))],
    cpu_training.InstanceNorm3d: [Case("contiguous", lambda: nn.InstanceNorm3d(6), _x(2, 6, 5, 6, 7)),
                                  Case("channels-last", lambda: nn.InstanceNorm3d(6, affine=True),
                                       _x(2, 6, 5, 6, 7, layout=CL3))],
    cpu_training.ConvNormAct: [
        Case("1x1 IN PReLU, NCDHW (GEMMs)", lambda: glims_blocks.conv_in_prelu(nn.Conv3d, 12, 6), _x(2, 12, 4, 5, 6)),
        Case("3x3 BN SiLU, channels-last (GEMM weight grad)",
             lambda: common.ConvNormAct(nn.Conv2d, 32, 32, 3, nn.BatchNorm2d, nn.SiLU), _x(2, 32, 12, 10, layout=CL)),
        Case("on parts", lambda: glims_blocks.conv_in_prelu(nn.Conv3d, 12, 6),
             lambda d: list(_x(2, 12, 4, 5, 6)(d)[0].split([5, 7], dim=1)),
             call=lambda m, a, b: m.forward_on_parts([a.contiguous(), b.contiguous()]),
             call_reference=lambda m, a, b: m(torch.cat([a, b], dim=1)))],
    cpu_training.LGMSNet: [Case("2D", _small_lgmsnet, _x(2, 3, 32, 32)),
                           Case("3D", lambda: _small_lgmsnet(3), _x(2, 1, 8, 16, 16))],
    cpu_training.LGMSNetEncoder: [Case("2D, one input channel",
                                       lambda: LGMSNet(1, 2, features_per_stage=(8, 8, 16, 16, 16)).encoder,
                                       _x(2, 1, 32, 32))],
    cpu_training.LGMSNetDecoder: [Case("2D, channels-last skips", lambda: _small_lgmsnet().decoder,
                                       lambda d: [s.contiguous(memory_format=CL) for s in
                                                  _skips_of(_small_lgmsnet, (2, 3, 32, 32))(d)],
                                       call=lambda m, *skips: m(list(skips)))],
    cpu_training.LocalMultiscaleBlock: [
        Case("2D merged", lambda: lgms_blocks.LocalMultiscaleBlock(nn.Conv2d, 8, nn.BatchNorm2d), _x(2, 8, 12, 11)),
        Case("3D", lambda: lgms_blocks.LocalMultiscaleBlock(nn.Conv3d, 8, nn.InstanceNorm3d, plan_kernel=(1, 3, 3)),
             _x(2, 8, 4, 9, 10, layout=CL3))],
    cpu_training.FusionConv: [
        Case("blockwise", lambda: lgms_blocks.FusionConv(nn.Conv2d, 16, 8, nn.BatchNorm2d), _x(2, 16, 40, 30,
                                                                                               layout=CL)),
        Case("parts", lambda: lgms_blocks.FusionConv(nn.Conv2d, 64, 32, nn.BatchNorm2d),
             lambda d: [t.contiguous(memory_format=CL) for t in _x(2, 64, 12, 10)(d)[0].split(32, dim=1)],
             call=lambda m, a, b: m.forward_parts([a, b]),
             call_reference=lambda m, a, b: m(torch.cat([a, b], dim=1)))],
    cpu_training.MultiHeadSelfAttention: [
        Case("padded heads", lambda: attention.MultiHeadSelfAttention(24), _x(3, 130, 24)),
        Case("short sequences", lambda: attention.MultiHeadSelfAttention(24), _x(3, 20, 24))],
    cpu_training.SparseTransformer: [Case("channels-last", lambda: attention.SparseTransformer(12, 24),
                                          _x(2, 12, 8, 6, layout=CL))],
    cpu_training.StridedConvINPReLU: [Case("3D down", lambda: glims_blocks.StridedConvINPReLU(nn.Conv3d, 6, 12,
                                                                                              (1, 2, 2)),
                                           _x(2, 6, 4, 8, 6))],
    cpu_training.DACB: [Case("3D", lambda: glims_blocks.DACB(nn.Conv3d, 6, 12, plan_kernel=(1, 3, 3)),
                             _x(2, 6, 5, 9, 8)),
                        Case("2D", lambda: glims_blocks.DACB(nn.Conv2d, 6, 12), _x(2, 6, 11, 9))],
    cpu_training.CSAB: [Case("3D", lambda: glims_blocks.CSAB(nn.Conv3d, 8), _x(2, 8, 5, 6, 7))],
    cpu_training.GLIMSDecoder: [Case("3D heads", lambda: _small_glims().decoder,
                                     _skips_of(_small_glims, (2, 1, 8, 32, 32)),
                                     call=lambda m, *t: m(list(t[:-1]), t[-1]))],
    runtime.RuntimeLGMSNet: [Case("2D", lambda: _small_lgmsnet(ds=False), _x(2, 3, 32, 32), backward=False,
                                  eval_mode=True, dtypes=(torch.float32,), settings=("cpu_inference",), float32_tolerance=1e-3),
                             Case("3D", lambda: _small_lgmsnet(3, ds=False), _x(1, 1, 8, 16, 16), backward=False,
                                  eval_mode=True, dtypes=(torch.float32,), settings=("cpu_inference",), float32_tolerance=1e-3)],
    # GLIMS on OpenVINO restricted to one core: 1.03e-3 of the largest magnitude (its kernels depend on the cores)
    runtime.RuntimeGLIMS: [Case("3D", lambda: _small_glims(ds=False), _x(1, 1, 8, 32, 32), backward=False,
                                eval_mode=True, dtypes=(torch.float32,), settings=("cpu_inference",), float32_tolerance=2e-3)],
    cuda_graphs.GraphedLGMSNet: [Case("2D", lambda: _small_lgmsnet(ds=False), _x(2, 3, 32, 32), backward=False,
                                      eval_mode=True, device="cuda", settings=("cuda_inference",))],
    cuda_graphs.GraphedGLIMS: [Case("3D", lambda: _small_glims(ds=False), _x(1, 1, 8, 32, 32), backward=False,
                                    eval_mode=True, device="cuda", settings=("cuda_inference",))],
}

# where each class hands over to its reference: a context manager factory, and the case it applies to
DECLINES = {cls: "no_grad" for cls in CASES if cls.__module__.endswith("cpu_training")}
DECLINES.update({runtime.RuntimeLGMSNet: "grad", runtime.RuntimeGLIMS: "deep_supervision",
                 cuda_graphs.GraphedLGMSNet: "cpu", cuda_graphs.GraphedGLIMS: "cpu"})


def test_every_registered_class_has_its_cases():
    for (reference, setting), cls in registered().items():
        assert CASES.get(cls), f"{cls.__qualname__} ({setting}) has no equality case against {reference.__name__}"
        assert cls in DECLINES, f"{cls.__qualname__} ({setting}) has no case where it declines"
        if setting == "cpu_training":
            assert all(c.backward for c in CASES[cls]), f"{cls.__qualname__}: training classes test the backward"


def _ids(items):
    return [f"{cls.__qualname__}-{case.name}" for cls, case in items]


EQUALITY = [(cls, case) for cls, cases in CASES.items() for case in cases]


def _run(module, case, args, reference: bool):
    call = case.call_reference if reference and case.call_reference else case.call
    out = call(module, *args)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _pair(cls, case, dtype):
    torch.manual_seed(0)
    reference = case.build().to(device=case.device, dtype=dtype)
    fast = accelerate(copy.deepcopy(reference), case.settings)[0]
    assert any(isinstance(m, cls) for m in fast.modules()), f"{cls.__qualname__} was not installed"
    for m in (reference, fast):
        m.train(not case.eval_mode)
    return reference, fast


def _outputs_and_grads(module, case, inputs, is_reference):
    args = [t.clone().requires_grad_(case.backward) for t in inputs]
    with torch.set_grad_enabled(case.backward):
        if case.eval_mode:  # (the runtime and the graphs serve repeated calls: the second one too)
            _run(module, case, args, is_reference)
        out = _run(module, case, args, is_reference)
    if not case.backward:
        return [o.detach() for o in out]
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum() for o in out)
    loss.backward()
    grads = [a.grad for a in args] + [p.grad for p in module.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), f"{case.name}: a gradient is missing"
    return [o.detach() for o in out] + grads


@pytest.mark.parametrize("cls, case", EQUALITY, ids=_ids(EQUALITY))
def test_accelerated_equals_reference(cls, case):
    """float64: the accelerated result equals the reference's to round-off (relative 1e-9, absolute 1e-10 of the
    largest magnitude). float32: it lies as close to the float64 reference as the reference's own float32 result
    does (within 4x its largest error, plus 1e-5 of the largest magnitude), so networks whose chained norms amplify
    float32 round-off are held to what the reference itself achieves. The inference runtime's cases (OpenVINO's own
    float32 kernels, e.g. its normalisations, round differently and pick other kernels per thread count) are held
    to 1e-3 (GLIMS: 2e-3) of the largest magnitude or 4x the reference's own float32 error, whichever is larger."""
    if case.device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    exact = None
    for dtype in sorted(case.dtypes, key=lambda d: d != torch.float64):
        reference, fast = _pair(cls, case, dtype)
        inputs = [t.to(case.device) for t in case.inputs(dtype)]
        ref = _outputs_and_grads(reference, case, inputs, True)
        out = _outputs_and_grads(fast, case, inputs, False)
        assert [t.shape for t in out] == [t.shape for t in ref]
        if dtype == torch.float64:
            exact = ref
            scale = max(float(t.abs().max()) for t in ref)
            for i, (a, b) in enumerate(zip(out, ref)):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10 * scale, msg=f"{case.name}: tensor {i}")
            continue
        if exact is None:  # (float32-only cases: the reference in float64 gives the exact result)
            reference64, _ = _pair(cls, case, torch.float64)
            exact = _outputs_and_grads(reference64, case, [t.double() for t in inputs], True)
        scale = max(float(t.abs().max()) for t in exact)
        for i, (a, b, e) in enumerate(zip(out, ref, exact)):
            err_fast = float((a.double() - e).abs().max())
            err_ref = float((b.double() - e).abs().max())
            if case.float32_tolerance is not None:
                assert err_fast <= max(case.float32_tolerance * scale, 4 * err_ref), \
                    f"{case.name}: tensor {i}: error {err_fast:.3g} (the reference's own {err_ref:.3g}, scale {scale:.3g})"
                continue
            assert err_fast <= 4 * err_ref + 1e-5 * scale, \
                f"{case.name}: tensor {i}: error {err_fast:.3g} against the reference's own {err_ref:.3g}"


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls, case", [(c, CASES[c][0]) for c in CASES], ids=_ids([(c, CASES[c][0]) for c in CASES]))
def test_accelerated_declines_to_the_reference(cls, case, monkeypatch):
    """Where its guard does not hold, the accelerated module runs exactly the reference's ops."""
    kind = DECLINES[cls]
    device = "cpu" if kind == "cpu" else case.device
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    dtype = case.dtypes[-1]
    reference, fast = _pair(cls, Case(**{**case.__dict__, "device": device}), dtype)
    grad = kind == "grad"
    if kind == "deep_supervision":
        reference.decoder.deep_supervision = fast.decoder.deep_supervision = True
    inputs = [t.to(device) for t in case.inputs(dtype)]
    runs = []
    for module, is_ref in ((reference, True), (fast, False)):
        with torch.set_grad_enabled(grad), _Ops() as ops:
            out = _run(module, case, [t.clone() for t in inputs], is_ref and case.call_reference is not None)
        runs.append((ops.ops, [o.detach() for o in out]))
    (ops_r, out_r), (ops_f, out_f) = runs
    assert ops_f == ops_r
    assert all(torch.equal(a, b) for a, b in zip(out_f, out_r))


# ------------------------------------------------------------------------------------------------ accelerate()
def test_state_dict_and_parameters_are_kept():
    for make in (_small_lgmsnet, _small_glims):
        reference = make()
        fast = accelerate(copy.deepcopy(reference))[0]
        assert list(fast.state_dict()) == list(reference.state_dict())
        assert [p.shape for p in fast.parameters()] == [p.shape for p in reference.parameters()]
        back = to_reference(copy.deepcopy(fast))
        assert not accelerated_modules(back) and all(type(a) is type(b) for a, b in zip(back.modules(),
                                                                                         reference.modules()))
        fast.load_state_dict(reference.state_dict())  # a checkpoint of either loads into the other
        reference.load_state_dict(fast.state_dict())


def test_report_names_what_was_swapped():
    net, report = accelerate(_small_lgmsnet())
    text = str(report)
    assert "LGMSNet x1: cpu_training.LGMSNet, runtime.RuntimeLGMSNet, cuda_graphs.GraphedLGMSNet" in text
    assert "LocalMultiscaleBlock x3: cpu_training.LocalMultiscaleBlock" in text
    _, none = accelerate(_small_lgmsnet(), "none")
    assert str(none) == "acceleration (none): nothing swapped"


def test_one_setting_gives_the_plain_reference(monkeypatch):
    assert resolve_settings("all") == ("cpu_training", "cpu_inference", "cuda_inference")
    assert resolve_settings(["cuda_inference", "cpu_training"]) == ("cpu_training", "cuda_inference")
    for value in ("none", "off", "0"):
        monkeypatch.setenv(ENV_VAR, value)
        assert resolve_settings() == ()
        assert not accelerated_modules(accelerate(_small_lgmsnet())[0])
    monkeypatch.setenv(ENV_VAR, "cpu_training")
    net = accelerate(_small_lgmsnet())[0]
    assert type(net) is cpu_training.LGMSNet
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match="unknown acceleration setting"):
        resolve_settings()


def test_trainers_build_accelerated_networks_unless_switched_off(monkeypatch):
    from nnunetv2_lgms.trainers import nnUNetTrainerGLIMS, nnUNetTrainerLGMSNet
    from plans_utils import managers

    for trainer, plan in ((nnUNetTrainerLGMSNet, "2d_48_3pools"), (nnUNetTrainerGLIMS, "3d_40x56x40_hippocampus")):
        pm, cm = managers(plan)
        net = trainer.build_network_architecture(pm, cm, 1, 2, True)
        assert accelerated_modules(net) and net.decoder.deep_supervision
        monkeypatch.setenv(ENV_VAR, "none")
        assert not accelerated_modules(trainer.build_network_architecture(pm, cm, 1, 2, True))
        monkeypatch.delenv(ENV_VAR)


def test_reference_copy_leaves_the_network_alone():
    net = accelerate(_small_lgmsnet())[0]
    ref = reference_copy(net)
    assert accelerated_modules(net) and not accelerated_modules(ref)
    for a, b in zip(net.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ the CPU runtime
def test_runtime_engine_follows_the_weights():
    """A weight change (an optimiser step, or another fold's checkpoint) gives a new engine; the same weights
    loaded again (nnU-Net's predictor reloads each fold's weights per case) reuse the engine."""
    torch.manual_seed(0)
    net = accelerate(_small_lgmsnet(ds=False), "cpu_inference")[0].eval()
    ref = reference_copy(net)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-3, atol=1e-4 * float(ref(x).abs().max()))
        engines = net._runtime_engines.engines
        assert len(engines) == 1
        state = copy.deepcopy(net.state_dict())
        net.load_state_dict(state)
        net(x)
        assert len(engines) == 1
        for p in net.parameters():
            p.add_(0.01)
        ref.load_state_dict(net.state_dict())
        torch.testing.assert_close(net(x), ref(x), rtol=1e-3, atol=1e-4 * float(ref(x).abs().max()))
        assert len(engines) == 2
        net.load_state_dict(state)
        net(x)
        assert len(engines) == 2  # the first weights' engine again


def test_runtime_falls_back_with_one_warning_when_not_installed(monkeypatch):
    from nnunetv2_lgms.deploy import engines

    def unavailable(*args, **kwargs):
        raise engines.RuntimeUnavailable("openvino is not installed; pip install \"nnunetv2_lgms[deploy]\"")

    monkeypatch.setattr(engines, "engine_for", unavailable)
    monkeypatch.setattr(runtime, "_warned", set())
    net = accelerate(_small_lgmsnet(ds=False), "cpu_inference")[0].eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"PyTorch reference.*nnunetv2_lgms\[deploy\]"):
        out = net(x)
    with torch.no_grad():
        assert torch.equal(out, reference_copy(net)(x))
