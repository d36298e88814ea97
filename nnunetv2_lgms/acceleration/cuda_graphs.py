"""CUDA-graph replay of a network's inference forward (setting ``cuda_inference``).

On a GPU at nnU-Net's patch sizes LGMSNet and GLIMS are bound by kernel launches, not by arithmetic: the forward
takes as long at batch 1 as at the plan's batch, and the time follows the number of dispatched operations rather
than FLOPs (results/speed_gpu/README.md). A CUDA graph records the forward's kernels once and replays them with a
single launch, so the host no longer walks the network op by op (H100: LGMSNet-2D's sliding-window prediction 4.7x
faster, results/speed_gpu_h100/README.md).

The accelerated :class:`GraphedLGMSNet` and :class:`GraphedGLIMS` stand in for the networks: in eval mode, without autograd, on CUDA (what ``nnUNetv2_predict`` does; not under
``torch.compile``, which ``nnUNetv2_train`` applies by default) the forward of an input signature (shape, strides,
dtype, device, autocast and inference-mode state, deep supervision) runs eagerly the first time (it warms cuDNN's
algorithm choice and the networks' inference caches), is captured the second time and replayed from then on. The
replayed kernels are the eager ones, so the result is the same; every call returns fresh tensors (nnU-Net's
mirroring adds into the first output in place).

Graphs are dropped when any parameter or buffer changes (its storage or its version counter: an optimiser step,
``load_state_dict``, ``.to()``), when a parameter, buffer or submodule is registered anywhere in the process (a
replaced layer, ``load_state_dict(assign=True)``), so a replay never reads stale weights, and when the module returns
to training mode, so their memory pool is not held through training. With several folds, ``nnUNetv2_predict``
loads each fold's weights per case: each fold then warms up and captures again (one eager forward and one capture
per fold and case). A forward that cannot be captured (a host sync, a copy from pageable memory) runs eagerly from
then on, with one warning.

Memory: the graphs of one network (at most four input signatures) share a private pool of about one forward's
activations per signature, which ``torch.cuda.empty_cache()`` does not release; on a nearly full GPU switch them
off: ``nnUNet_lgms_cuda_graphs=0`` in the environment, or ``module.cuda_graph_inference = False``.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Callable, Hashable, List, Optional, Tuple

import torch
from torch import nn

from nnunetv2_lgms.acceleration.cpu_kernels import is_compiling
from nnunetv2_lgms.acceleration.registry import register
from nnunetv2_lgms.networks import glims, lgmsnet

ENV_SWITCH = "nnUNet_lgms_cuda_graphs"
_CAPTURE_FAILED = object()
_registrations = 0  # parameters, buffers and submodules registered in this process since the hooks went in
_hooks_installed = False


def _count_registration(*_args) -> None:
    global _registrations
    _registrations += 1


def _install_registration_hooks() -> None:
    """Count registrations of parameters, buffers and submodules anywhere in the process (a replaced layer, or
    ``load_state_dict(assign=True)``), so that a graph never replays stale weights. Installed at the first graph."""
    global _hooks_installed
    if not _hooks_installed:
        torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
        torch.nn.modules.module.register_module_buffer_registration_hook(_count_registration)
        torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
        _hooks_installed = True


def versioned_state(owner: nn.Module) -> Optional[List[torch.Tensor]]:
    """``owner``'s parameters and buffers, or None where their changes cannot be followed: meta tensors, and
    inference tensors (e.g. weights created or converted under ``torch.inference_mode``), which have no version
    counter."""
    sources = [*owner.parameters(), *owner.buffers()]
    if any(t.device.type == "meta" or t.is_inference() for t in sources):
        return None
    return sources


def cuda_graphs_enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "f", "false", "no", "off")


def _under_dispatch_mode() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def _clone_output(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone_output(o) for o in out)
    raise TypeError(f"a graphed forward must return tensors or lists of tensors, got {type(out).__name__}")


class _CapturedForward:
    """One captured forward: a static input the caller's input is copied into, the graph, its static output."""

    def __init__(self, static_input: torch.Tensor, graph, static_output):
        self.static_input, self.graph, self.static_output = static_input, graph, static_output

    def __call__(self, x: torch.Tensor):
        self.static_input.copy_(x)
        self.graph.replay()
        # a copy: the next replay overwrites the static output, and nnU-Net's mirroring adds into this one
        return _clone_output(self.static_output)


def capture_cuda_graph(forward: Callable, x: torch.Tensor, pool) -> _CapturedForward:
    """Capture ``forward`` on a static copy of ``x`` (CUDA) into a graph that allocates from ``pool``.

    The autocast state of the caller is kept, with its weight-cast cache off during the capture: a cast weight the
    cache already holds would be read by the graph from memory the cache frees when the caller's autocast region
    ends, so every cast must be recorded as a kernel of the graph instead."""
    device_type = x.device.type
    enabled = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type)
    static_input = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(x.device):
        caller_stream = torch.cuda.current_stream()
        try:
            # a capture stream on the input's device (torch.cuda.graph's default one lives on the first device used)
            with torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False), torch.cuda.graph(
                    graph, pool=pool, stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
                static_output = forward(static_input)
        finally:  # a capture that fails in its end does not switch back to the caller's stream
            torch.cuda.set_stream(caller_stream)
    return _CapturedForward(static_input, graph, static_output)


class InferenceGraphs:
    """The captured forwards of one module, keyed by input signature (least recently used dropped beyond
    ``max_graphs``); all share one memory pool. ``capture`` is the function that records a forward (a stand-in
    in the CPU tests of the cache's logic)."""

    def __init__(self, max_graphs: int = 4, capture: Callable = capture_cuda_graph):
        self.max_graphs = max_graphs
        self.capture = capture
        self.graphs: "OrderedDict[Hashable, object]" = OrderedDict()
        self.warmed: set = set()
        self.state_tensors: Optional[List[torch.Tensor]] = None
        self.state_signature: Optional[Tuple] = None
        self.pool = None
        self.warned = False

    def clear(self) -> None:
        """Drop every graph, the warm-up record and the cached list of the module's tensors."""
        self.graphs.clear()
        self.warmed.clear()
        self.state_tensors = None
        self.state_signature = None
        self.pool = None

    def _signature(self, module: nn.Module) -> Optional[Tuple]:
        """Storage and version of every parameter and buffer; None where they cannot be followed."""
        if self.state_tensors is None:
            self.state_tensors = versioned_state(module)
            if self.state_tensors is None:
                return None
        return (_registrations, *((t.data_ptr(), t._version) for t in self.state_tensors))

    def __call__(self, module: nn.Module, forward: Callable, x: torch.Tensor, extra_key: Hashable = ()):
        signature = self._signature(module)
        if signature != self.state_signature:
            self.clear()  # (also the cached tensor list: the next line lists the module's tensors anew)
            self.state_signature = self._signature(module)
        if self.state_signature is None:  # weights without version counters: a stale graph would go unnoticed
            return forward(x)
        device_type = x.device.type
        # (inference mode: a static input made under it cannot be written to outside it)
        key = (tuple(x.shape), x.stride(), x.dtype, str(x.device), torch.is_autocast_enabled(device_type),
               torch.get_autocast_dtype(device_type), torch.is_inference_mode_enabled(), extra_key)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.warmed:
                self.warmed.add(key)
                return forward(x)
            entry = self._capture(forward, x, key)
        if entry is _CAPTURE_FAILED:
            return forward(x)
        self.graphs.move_to_end(key)
        return entry(x)

    def _capture(self, forward: Callable, x: torch.Tensor, key: Hashable):
        if self.pool is None and x.is_cuda:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            entry = self.capture(forward, x, self.pool)
        except Exception as e:  # noqa: BLE001 - any capture failure: this signature stays eager
            if not self.warned:
                warnings.warn(f"CUDA graph capture of the inference forward failed ({type(e).__name__}: {e}); this "
                              f"input shape runs eagerly", RuntimeWarning, stacklevel=3)
                self.warned = True
            entry = _CAPTURE_FAILED
        self.graphs[key] = entry
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return entry


class GraphedInference:
    """For a network class: the eval forward runs from CUDA graphs where that is safe (module docstring)."""

    cuda_graph_inference: bool = True

    def _inference_graphs(self) -> InferenceGraphs:
        graphs = self.__dict__.get("_cuda_graphs")
        if graphs is None:
            _install_registration_hooks()
            graphs = self.__dict__["_cuda_graphs"] = InferenceGraphs()
        return graphs

    def graphs_apply(self, x: torch.Tensor) -> bool:
        """Whether this call may run from a CUDA graph: eval mode, no autograd, a CUDA input, nothing tracing
        (torch.compile, a dispatch mode such as FLOP counting), no capture already under way, switch on."""
        return (self.cuda_graph_inference and x.is_cuda and not self.training and not torch.is_grad_enabled()
                and not is_compiling() and not _under_dispatch_mode()
                and not torch.cuda.is_current_stream_capturing() and cuda_graphs_enabled_by_env())

    def forward(self, x: torch.Tensor):
        if not self.graphs_apply(x):
            return super().forward(x)
        return self._inference_graphs()(self, super().forward, x, extra_key=self.decoder.deep_supervision)

    def train(self, mode: bool = True):  # back to training: free the graphs' memory pool for the training steps
        if mode:
            self.__dict__.pop("_cuda_graphs", None)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(): new storages, new buffer objects
        self.__dict__.pop("_cuda_graphs", None)
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):  # with assign=True the parameters are new objects
        self.__dict__.pop("_cuda_graphs", None)
        return super().load_state_dict(*args, **kwargs)

    def __getstate__(self):  # deepcopy / pickling: the graphs belong to the original's tensors
        state = self.__dict__.copy()
        state.pop("_cuda_graphs", None)
        return state


@register(lgmsnet.LGMSNet, "cuda_inference")
class GraphedLGMSNet(GraphedInference, lgmsnet.LGMSNet):
    pass


@register(glims.GLIMS, "cuda_inference")
class GraphedGLIMS(GraphedInference, glims.GLIMS):
    pass


class GraphedModule(GraphedInference, nn.Module):
    """Any network with this module's CUDA-graph inference: the benchmarks wrap nnU-Net's own network in it
    (``--cuda-graphs all``) to compare architectures with the launch overhead removed on both sides. The state
    dict's keys gain the prefix ``module.``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor):
        if not self.graphs_apply(x):
            return self.module(x)
        decoder = getattr(self.module, "decoder", None)
        return self._inference_graphs()(self, self.module, x, extra_key=getattr(decoder, "deep_supervision", None))
