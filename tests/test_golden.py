"""The networks compute what they computed before their reference code and their speed paths were separated.

``tests/golden/*.pt`` were written by ``tests/golden/make_golden.py`` on the code before the separation: eval
outputs and one training step (gradient digests, BatchNorm statistics) of four small networks, on the plain path
and as shipped, in float64 and float32. Here the reference network (``networks/``) must equal the plain path to
float64 precision, and the accelerated network (``acceleration.accelerate``) the path as shipped: to float64
precision in float64, and in float32 within the float32 tolerance the shipped path had against the reference.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from nnunetv2_lgms.acceleration import accelerate
from nnunetv2_lgms.networks.glims import GLIMS
from nnunetv2_lgms.networks.lgmsnet import LGMSNet

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from make_golden import digest, eval_output, golden_input, network_configs, synthetic_state, training_step  # noqa

NETWORKS = list(network_configs())
#: (relative, absolute per element against the largest gradient): float64 round-off, and float32 as the shipped path
#: had it against the float64 reference (the tolerances of the equality tests of the code before the separation)
RTOL = {torch.float64: 1e-9, torch.float32: 1e-3}
ATOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def recorded_threads():
    """Two torch threads, as the golden tensors were recorded. float32 reductions change with the thread count: at
    one thread LGMSNet-2D's accelerated (channels-last) float32 gradient of ``encoder.stem.1.bias`` lies 1.3 % from
    the float64 one, outside the tolerance the recorded paths held (its reference layout stays inside)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def load(name):
    return torch.load(GOLDEN / f"{name}.pt", weights_only=False)


def build(name, dtype, accelerated):
    make, shape = network_configs()[name]
    torch.manual_seed(0)
    net = make()
    keys = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    state = synthetic_state(keys, net.state_dict())
    net.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    net = net.to(dtype)
    if accelerated:
        net = accelerate(net)[0]
    return net, golden_input(shape).to(dtype)


def assert_digest_close(new, ref, numel, rtol, what, atol=0.0):
    """Digests ``[sum, sum of squares, projection]`` of tensors of ``numel`` elements whose elements agree within
    ``rtol`` relative and ``atol`` absolute (round-off of a value that is zero in exact math, e.g. a conv bias before
    a norm, is that of the magnitudes around it): the sum of squares within the bound this implies, the sum and the
    projection within ``rtol * sqrt(numel) * ||t||`` (which bounds both) plus ``3 sqrt(numel) atol``."""
    norm = math.sqrt(float(ref[1]))
    sq_bound = 2 * rtol * float(ref[1]) + 2 * math.sqrt(numel) * atol * norm + numel * atol ** 2 + 1e-300
    assert abs(float(new[1]) - float(ref[1])) <= sq_bound, f"{what}: sum of squares {float(new[1])} vs {float(ref[1])}"
    bound = rtol * math.sqrt(numel) * norm + 3 * math.sqrt(numel) * atol + 1e-300
    assert abs(float(new[0]) - float(ref[0])) <= bound, f"{what}: sum {float(new[0])} vs {float(ref[0])}"
    assert abs(float(new[2]) - float(ref[2])) <= bound, f"{what}: projection {float(new[2])} vs {float(ref[2])}"


def assert_step_close(step, record, tag, dtype, net, x_numel):
    """float64: the gradients equal the recorded path's. float32: they lie as close to the recorded float64 gradients
    as the recorded float32 paths did (``test_golden_tolerances_hold_between_the_recorded_paths``); comparing two
    float32 results would add both round-offs, and float32 sums over a batch change with the thread count."""
    grads, stats, scale = step
    rtol, atol = RTOL[dtype], ATOL[dtype] * scale
    ref_grads = record["grads_plain64" if dtype == torch.float32 else f"grads_{tag}"]
    ref_stats = record[f"stats_{tag}"]
    assert grads.keys() == ref_grads.keys()
    numels = {n: p.numel() for n, p in net.named_parameters()}
    for name in grads:
        assert_digest_close(grads[name], ref_grads[name], numels.get(name, x_numel), rtol, name, atol)
    assert stats.keys() == ref_stats.keys()
    for name in stats:
        torch.testing.assert_close(stats[name].double(), ref_stats[name].double(), rtol=rtol, atol=ATOL[dtype],
                                   msg=name)


def step(net, x):
    """One training step's gradient digests and statistics, and the largest gradient magnitude."""
    grads, stats = training_step(net, x)
    scale = max(float(p.grad.abs().max()) for p in net.parameters() if p.grad is not None)
    return grads, stats, scale


def assert_output_close(out, record, tag, dtype):
    ref = record["eval_plain64"]
    atol = ATOL[dtype] * float(ref.abs().max())
    if tag == "plain64":
        torch.testing.assert_close(out.double(), ref, rtol=RTOL[dtype], atol=atol)
    else:
        assert_digest_close(digest("<output>", out), record[f"eval_{tag}"], out.numel(), RTOL[dtype], "output", atol)


@pytest.mark.parametrize("name", NETWORKS)
def test_reference_equals_plain_path_float64(name):
    record = load(name)
    net, x = build(name, torch.float64, accelerated=False)
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == [(k, tuple(s)) for k, s in record["keys"]]
    assert_output_close(eval_output(net, x), record, "plain64", torch.float64)
    assert_step_close(step(net, x), record, "plain64", torch.float64, net, x.numel())


@pytest.mark.parametrize("name", NETWORKS)
def test_reference_equals_plain_path_float32(name):
    record = load(name)
    net, x = build(name, torch.float32, accelerated=False)
    assert_output_close(eval_output(net, x), record, "plain32", torch.float32)
    assert_step_close(step(net, x), record, "plain32", torch.float32, net, x.numel())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", NETWORKS)
def test_accelerated_equals_shipped_path(name, dtype):
    """Eval output (on CPU the inference runtime, in float32) and one training step (the CPU training kernels)."""
    record = load(name)
    net, x = build(name, dtype, accelerated=True)
    tag = "shipped64" if dtype == torch.float64 else "shipped32"
    assert_output_close(eval_output(net, x), record, tag, dtype)
    assert_step_close(step(net, x), record, tag, dtype, net, x.numel())


def test_golden_tolerances_hold_between_the_recorded_paths():
    """The float32 tolerances held between the recorded float32 paths and the float64 reference (so they were not
    loosened for the new code)."""
    for name in NETWORKS:
        record = load(name)
        net, x = build(name, torch.float64, accelerated=False)
        scale = step(net, x)[2]
        numels = {n: p.numel() for n, p in net.named_parameters()}
        ref_out = record["eval_plain64"]
        for tag in ("shipped32", "plain32"):
            assert_digest_close(record[f"eval_{tag}"], digest("<output>", ref_out), ref_out.numel(),
                                RTOL[torch.float32], f"{name} {tag}", ATOL[torch.float32] * float(ref_out.abs().max()))
            for key, ref in record["grads_plain64"].items():
                assert_digest_close(record[f"grads_{tag}"][key], ref, numels.get(key, x.numel()),
                                    RTOL[torch.float32], f"{name} {tag} {key}", ATOL[torch.float32] * scale)


FULL_SIZE_PLANS = {"2d": ((256, 256), [[1, 1]] + [[2, 2]] * 6, [[3, 3]] * 7, 3),
                   "3d": ((40, 56, 40), [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, 1)}


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("cls", [LGMSNet, GLIMS], ids=["LGMSNet", "GLIMS"])
def test_full_size_state_dict_keys_unchanged(cls, dim):
    """A checkpoint of a real training run on the code before the separation loads: same keys and shapes, with
    and without acceleration."""
    expected = json.loads((GOLDEN / "full_size_state_dict_keys.json").read_text())[f"{cls.__name__}_{dim}"]
    patch, strides, kernels, channels = FULL_SIZE_PLANS[dim]
    net = cls.from_plan(patch, strides, kernels, channels, 3, deep_supervision=True)
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == expected
    assert {k: list(v.shape) for k, v in accelerate(net)[0].state_dict().items()} == expected
