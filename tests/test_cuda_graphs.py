"""CUDA-graph inference (nnunetv2_lgms.acceleration.cuda_graphs, setting ``cuda_inference``).

The networks under test are accelerated copies, ``accelerate(LGMSNet(...))`` / ``accelerate(GLIMS(...))``, whose
class includes :class:`GraphedInference`; the CPU inference runtime is set to ``torch`` for the CPU forwards here
(an OpenVINO conversion is not what these tests are about, and costs seconds).

The cache's logic (when to warm up, capture, replay, invalidate, fall back) runs here on CPU with a stand-in for the
capture that behaves like a graph: it keeps a static input and output and, on replay, recomputes the output from the
*current* weights into the same static tensors. The real CUDA graphs are tested in the second half, which needs a GPU
(skipped without one). An earlier version of this file passed on a lent H100 (results/speed_gpu_h100/README.md); what
came after that run (inference mode in the signature, the registration counter, the per-device capture stream, the
eval-only statistic change below, the move to nnunetv2_lgms.acceleration with the registration hooks installed at
the first graph) has not run on a GPU yet."""
import copy
import os
import pickle
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from nnunetv2_lgms.acceleration import SETTINGS, accelerate, cuda_graphs
from nnunetv2_lgms.acceleration.cuda_graphs import ENV_SWITCH, GraphedInference, InferenceGraphs, _CapturedForward
from nnunetv2_lgms.acceleration.runtime import ENV_BACKEND
from nnunetv2_lgms.networks import glims, lgmsnet

CUDA = torch.cuda.is_available()


def LGMSNet(*args, **kwargs):  # noqa: N802 - stands for the accelerated network class
    """An accelerated LGMSNet, every setting (as the trainers build it; explicit, so that nnUNet_lgms_acceleration in
    the environment cannot switch it off)."""
    net = accelerate(lgmsnet.LGMSNet(*args, **kwargs), tuple(SETTINGS))[0]
    assert isinstance(net, GraphedInference)
    return net


def GLIMS(*args, **kwargs):  # noqa: N802
    net = accelerate(glims.GLIMS(*args, **kwargs), tuple(SETTINGS))[0]
    assert isinstance(net, GraphedInference)
    return net


@pytest.fixture(autouse=True)
def torch_cpu_runtime(monkeypatch):
    monkeypatch.setenv(ENV_BACKEND, "torch")


class FakeGraph:
    """A graph stand-in for :class:`_CapturedForward`: a replay recomputes into the static output, from the weights
    and the static input of the moment, as a real replay would."""

    def __init__(self, forward, static_input, static_output):
        self.forward, self.static_input, self.static_output = forward, static_input, static_output
        self.replays = 0

    def replay(self):
        self.static_output.copy_(self.forward(self.static_input))
        self.replays += 1


def fake_capture(log):
    def capture(forward, x, pool):
        static_input = x.clone()
        static_output = forward(static_input)
        graph = FakeGraph(forward, static_input, static_output)
        log.append(graph)
        return _CapturedForward(static_input, graph, static_output)
    return capture


class Net(GraphedInference, nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.calls = 0
        self.flag = False

    def forward(self, x):
        return self._inference_graphs()(self, self._forward, x, extra_key=self.flag)

    def _forward(self, x):
        self.calls += 1
        return self.norm(self.conv(x))


def graphed(net, log=None, max_graphs=4):
    """Give ``net`` a graph cache with the stand-in capture; returns the list the captures are logged in."""
    log = [] if log is None else log
    net.__dict__["_cuda_graphs"] = InferenceGraphs(max_graphs, fake_capture(log))
    return log


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


def test_warm_up_then_capture_then_replay(net):
    log = graphed(net)
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        eager = net._forward(x)
        first = net(x)
        assert log == []  # the first call of a signature runs eagerly (warm-up)
        second, third = net(x), net(x)
    assert len(log) == 1 and log[0].replays == 2  # captured once on the second call, replayed from then on
    for out in (first, second, third):
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
    second.add_(1)  # the caller owns its output (nnU-Net's mirroring adds into it)
    torch.testing.assert_close(net(x), eager, rtol=0, atol=0)
    with torch.no_grad():
        other = torch.randn_like(x)
        kept = net(x)
        torch.testing.assert_close(net(other), net._forward(other), rtol=0, atol=0)  # same signature: a replay
    torch.testing.assert_close(kept, eager, rtol=0, atol=0)  # untouched by the next replay


def test_each_input_signature_gets_its_own_graph(net):
    log = graphed(net)
    with torch.no_grad():
        for x in (torch.randn(1, 2, 8, 8), torch.randn(2, 2, 8, 8)):
            for _ in range(3):
                torch.testing.assert_close(net(x), net._forward(x), rtol=0, atol=0)
        net.double()
        graphed(net, log)
        x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
        for x in (x, x.contiguous(memory_format=torch.channels_last)):
            for _ in range(3):
                torch.testing.assert_close(net(x), net._forward(x), rtol=0, atol=0)
    assert len(log) == 4  # batch 1, batch 2, float64, and channels-last strides


def test_weight_changes_drop_the_graphs(net):
    log = graphed(net)
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        net(x), net(x)
        assert len(net._cuda_graphs.graphs) == 1
        net.conv.weight.mul_(2)  # in place (an optimiser step): same storage, new version
        calls = net.calls
        torch.testing.assert_close(net(x), net._forward(x), rtol=0, atol=0)
        assert net.calls == calls + 2 and not net._cuda_graphs.graphs  # dropped; warm-up again, then capture
        net(x)
        assert len(log) == 2
        net.norm.running_var.fill_(3.0)  # a buffer counts as much as a parameter
        torch.testing.assert_close(net(x), net._forward(x), rtol=0, atol=0)
        assert not net._cuda_graphs.graphs


def test_load_state_dict_and_to_drop_the_graphs(net):
    log = graphed(net)
    x = torch.randn(2, 2, 8, 8)
    other = Net().eval()
    with torch.no_grad():
        net(x), net(x)
        net.load_state_dict(other.state_dict(), assign=True)  # new parameter objects
        assert "_cuda_graphs" not in net.__dict__
        graphed(net, log)
        net(x), net(x)
        net.to(torch.float64)
        assert "_cuda_graphs" not in net.__dict__
        torch.testing.assert_close(net(x.double()), other.double()._forward(x.double()))


def test_training_mode_drops_the_graphs(net):
    graphed(net)
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        net(x), net(x)
    net.eval()
    assert net._cuda_graphs.graphs  # eval() keeps them
    net.train()
    assert "_cuda_graphs" not in net.__dict__


def test_weights_without_version_counters_stay_eager(net):
    """Weights converted under inference mode are inference tensors: their changes cannot be followed, so no graph
    (and no error)."""
    with torch.inference_mode():
        net.double()
    log = graphed(net)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    with torch.inference_mode():
        outs = [net(x) for _ in range(3)]
        assert log == [] and net.calls == 3
        torch.testing.assert_close(outs[-1], net._forward(x), rtol=0, atol=0)


def test_least_recently_used_graph_is_dropped(net):
    log = graphed(net, max_graphs=2)
    inputs = [torch.randn(b, 2, 8, 8) for b in (1, 2, 3)]
    with torch.no_grad():
        for x in inputs:
            net(x), net(x)
        assert [k[0][0] for k in net._cuda_graphs.graphs] == [2, 3]
    assert len(log) == 3  # three captured, the oldest dropped


def test_a_failed_capture_warns_once_and_stays_eager(net):
    attempts = []

    def failing(forward, x, pool):
        attempts.append(x.shape)
        raise RuntimeError("operation not permitted when stream is capturing")

    net.__dict__["_cuda_graphs"] = InferenceGraphs(capture=failing)
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [net(x) for _ in range(4)]
        net(torch.randn(1, 2, 8, 8)), net(torch.randn(1, 2, 8, 8))
    assert len(attempts) == 2  # once per signature, never retried
    assert len([w for w in caught if "CUDA graph capture" in str(w.message)]) == 1
    for out in outs:
        torch.testing.assert_close(out, net._forward(x), rtol=0, atol=0)


def test_graphs_apply_only_to_cuda_eval_without_autograd_nothing_tracing(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    net = LGMSNet(1, 2).eval()
    with torch.no_grad():
        assert not net.graphs_apply(torch.randn(1, 1, 32, 32))  # a CPU tensor
        net(torch.randn(1, 1, 32, 32))
    assert "_cuda_graphs" not in net.__dict__
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda_input = types.SimpleNamespace(is_cuda=True)  # all that graphs_apply reads of the input
    with torch.no_grad():
        assert net.graphs_apply(cuda_input)
        with TorchDispatchMode():
            assert not net.graphs_apply(cuda_input)
        with FlopCounterMode(display=False):  # FLOP counting is a dispatch mode
            assert not net.graphs_apply(cuda_input)
        monkeypatch.setenv(ENV_SWITCH, "0")
        assert not net.graphs_apply(cuda_input)
        monkeypatch.setenv(ENV_SWITCH, "1")
        net.cuda_graph_inference = False
        assert not net.graphs_apply(cuda_input)
        net.cuda_graph_inference = True
        net.train()
        assert not net.graphs_apply(cuda_input)
        net.eval()
    assert not net.graphs_apply(cuda_input)  # autograd on
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with torch.no_grad():
        assert not net.graphs_apply(cuda_input)  # inside someone else's capture


def test_inference_mode_and_no_grad_use_separate_graphs(net):
    log = graphed(net)
    x = torch.randn(2, 2, 8, 8)
    with torch.inference_mode():
        net(x), net(x)
    with torch.no_grad():  # a static input made in inference mode cannot be written to here
        net(x), net(x)
        torch.testing.assert_close(net(x), net._forward(x), rtol=0, atol=0)
    assert len(log) == 2


def test_module_switches_and_autocast_are_part_of_the_signature(net):
    log = graphed(net)
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        net(x), net(x)
        net.flag = True  # e.g. deep supervision on
        net(x), net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x), net(x)
            out = net(x)
        with torch.autocast("cpu", dtype=torch.float16):
            net(x), net(x)
            out16 = net(x)
    assert len(log) == 4 and out.dtype == torch.bfloat16 and out16.dtype == torch.float16


def test_replaced_layers_drop_the_graphs(net):
    log = graphed(net)
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        net(x), net(x)
        net.conv = nn.Conv2d(2, 3, 3, padding=1)  # new parameters the cached list does not hold
        out = net(x)
        assert not net._cuda_graphs.graphs
        torch.testing.assert_close(out, net._forward(x), rtol=0, atol=0)
        net(x)  # captured
        assert len(net._cuda_graphs.graphs) == 1
        # a sub-module's own load_state_dict with assign=True: new parameter objects, the top module not involved
        net.norm.load_state_dict({k: v + 1 for k, v in net.norm.state_dict().items()}, assign=True)
        out = net(x)
        assert not net._cuda_graphs.graphs  # dropped; this call was the new warm-up
        torch.testing.assert_close(out, net._forward(x), rtol=0, atol=0)
    assert len(log) == 2


@pytest.mark.parametrize("make, shape", [
    (lambda: LGMSNet(3, 2, nn.Conv2d), (1, 3, 64, 64)),
    (lambda: LGMSNet(1, 3, nn.Conv3d), (1, 1, 32, 32, 32)),
    (lambda: GLIMS(1, 3, nn.Conv2d, patch_size=(64, 64)), (1, 1, 64, 64)),
], ids=["lgmsnet-2d", "lgmsnet-3d", "glims-2d"])
def test_the_networks_register_nothing_while_running(make, shape):
    """A forward that registered a parameter, buffer or module would drop its own graphs on every call. (The counting
    hooks go in at the first graph; installed here, and checked to count.)"""
    cuda_graphs._install_registration_hooks()
    before = cuda_graphs._registrations
    nn.Module().register_buffer("b", torch.zeros(1))
    assert cuda_graphs._registrations == before + 1

    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(shape)
    before = cuda_graphs._registrations
    with torch.no_grad():
        net(x), net(x)
    net.train()
    net(x).sum().backward()
    assert cuda_graphs._registrations == before


def test_copies_and_pickles_leave_the_graphs_behind(net):
    graphed(net)
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        net(x), net(x)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert "_cuda_graphs" not in clone.__dict__
        with torch.no_grad():
            torch.testing.assert_close(clone._forward(x), net._forward(x), rtol=0, atol=0)


def test_registration_hooks_install_at_the_first_graph_not_at_import():
    """Importing the package, accelerating a network and running it on CPU (eval and training) leaves PyTorch's
    process-wide module registration hooks alone; the first graph cache installs them (a fresh interpreter)."""
    code = textwrap.dedent("""
        import torch
        import nnunetv2_lgms.acceleration
        from nnunetv2_lgms.acceleration import SETTINGS, accelerate, cuda_graphs
        from nnunetv2_lgms.networks.lgmsnet import LGMSNet

        assert not cuda_graphs._hooks_installed
        net = accelerate(LGMSNet(1, 2), tuple(SETTINGS))[0].eval()
        with torch.no_grad():
            net(torch.randn(1, 1, 32, 32))
        net.train()
        net(torch.randn(2, 1, 32, 32)).sum().backward()
        assert not cuda_graphs._hooks_installed, "installed before any graph"
        assert "_cuda_graphs" not in net.__dict__
        net._inference_graphs()
        assert cuda_graphs._hooks_installed
        print("ok")
    """)
    env = {**os.environ, ENV_BACKEND: "torch"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# --------------------------------------------------------------------------------------------- real CUDA graphs
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CI has none)")


def _networks():
    torch.manual_seed(0)
    return {
        "lgmsnet-2d": (LGMSNet(3, 2, nn.Conv2d), (2, 3, 64, 64)),
        "lgmsnet-3d": (LGMSNet(1, 3, nn.Conv3d, strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]),
                       (2, 1, 32, 48, 48)),
        "glims-3d": (GLIMS(1, 3, nn.Conv3d, patch_size=(64, 64, 64)), (1, 1, 64, 64, 64)),
    }


@needs_cuda
@pytest.mark.parametrize("name", ["lgmsnet-2d", "lgmsnet-3d", "glims-3d"])
@pytest.mark.parametrize("amp", [False, True])
def test_graph_replay_equals_eager_on_cuda(name, amp, monkeypatch):
    torch.backends.cudnn.benchmark = True
    net, shape = _networks()[name]
    net = net.cuda().eval()
    x = torch.randn(shape, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", enabled=amp):
        monkeypatch.setenv(ENV_SWITCH, "0")
        eager = net(x)
        eager_mirrored = net(x.flip(-1)).flip(-1)
        monkeypatch.setenv(ENV_SWITCH, "1")
        outs = [net(x) for _ in range(3)]
        graphs = net._cuda_graphs.graphs
        assert len(graphs) == 1 and all(hasattr(g, "graph") for g in graphs.values()), "captured, not eager"
        # nnU-Net's mirroring: the first output is added into in place while the graph runs again
        summed = net(x)
        summed += net(x.flip(-1)).flip(-1)
    tol = dict(rtol=2e-3, atol=2e-3) if amp else dict(rtol=1e-5, atol=1e-5)
    for out in outs:
        torch.testing.assert_close(out, eager, **tol)
    torch.testing.assert_close(summed, eager + eager_mirrored, **tol)


@needs_cuda
def test_graphs_follow_weight_updates_on_cuda():
    net, shape = _networks()["lgmsnet-2d"]
    net = net.cuda()
    x = torch.randn(shape, device="cuda")
    optimizer = torch.optim.SGD(net.parameters(), 0.1)
    for _ in range(2):
        net.train()
        out = net(x)
        out.float().square().mean().backward()
        optimizer.step()
        net.eval()
        with torch.no_grad():
            for _ in range(3):
                graphed_out = net(x)
            net.cuda_graph_inference = False
            eager = net(x)
            net.cuda_graph_inference = True
        torch.testing.assert_close(graphed_out, eager, rtol=1e-5, atol=1e-5)
    # in eval mode only (no train() in between): a BatchNorm statistic changes in place
    with torch.no_grad():
        for _ in range(3):
            net(x)
        next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d)).running_var.mul_(2)
        graphed_out = net(x)
        net.cuda_graph_inference = False
        eager = net(x)
        net.cuda_graph_inference = True
    torch.testing.assert_close(graphed_out, eager, rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("name", ["lgmsnet-2d", "lgmsnet-3d", "glims-3d"])
def test_amp_training_step_on_cuda(name):
    """Forward and backward under autocast with a GradScaler, as nnU-Net trains on CUDA (the CPU-only custom
    autograd paths must stand aside): finite loss and gradients for every parameter that the loss reaches."""
    net, shape = _networks()[name]
    net = net.cuda().train()
    net.decoder.deep_supervision = True
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(shape, device="cuda")
    with torch.autocast("cuda"):
        outs = net(x)
        loss = sum(o.float().square().mean() for o in outs)
    scaler.scale(loss).backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
