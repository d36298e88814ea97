"""CPU inference through an inference runtime (setting ``cpu_inference``).

What ``nnUNetv2_predict`` runs on a CPU is the network's eval forward without autograd, deep supervision off, one
tile at a time. There the accelerated network hands the tile to OpenVINO (or ONNX Runtime): the plain reference
network is converted for the tile's shape from the current weights (:func:`nnunetv2_lgms.deploy.engines.engine_for`)
the first time, and the compiled model runs every later tile of that shape. OpenVINO on the exported reference was
as fast as the hand-written CPU inference kernels it replaces (``results/speed_before_after``).

Weights: nnU-Net's predictor loads each fold's weights into the network before each case. An engine is kept per
input shape *and* weight content (a hash of every parameter and buffer, taken again only when a tensor's storage or
version counter changed), so the folds of an ensemble each compile once and a changed weight is never served stale;
at most :data:`MAX_ENGINES` engines per network are kept (least recently used dropped).

Choice: ``nnUNet_lgms_cpu_runtime=openvino`` (default), ``onnxruntime``, or ``torch`` (the reference in PyTorch).
Precision: float32; ``nnUNet_lgms_cpu_precision=bf16`` opts into bfloat16 where the CPU supports it (check the
label agreement on your data first). Without the runtime installed (``pip install "nnunetv2_lgms[deploy]"``) the
reference runs in PyTorch, with one warning; a network the runtime cannot convert does too.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import nn

from nnunetv2_lgms.acceleration.cpu_kernels import is_compiling
from nnunetv2_lgms.acceleration.registry import register
from nnunetv2_lgms.networks import glims, lgmsnet

ENV_BACKEND = "nnUNet_lgms_cpu_runtime"
ENV_PRECISION = "nnUNet_lgms_cpu_precision"
BACKENDS = ("openvino", "onnxruntime", "torch")
MAX_ENGINES = 8
_warned = set()


def backend() -> str:
    name = os.environ.get(ENV_BACKEND, "openvino").strip().lower() or "openvino"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def precision() -> str:
    name = os.environ.get(ENV_PRECISION, "f32").strip().lower() or "f32"
    if name not in ("f32", "bf16"):
        raise ValueError(f"{ENV_PRECISION}={name!r}: choose f32 or bf16")
    return name


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _under_dispatch_mode() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def weights_digest(net: nn.Module) -> str:
    """A hash of the values of every parameter and buffer of ``net``."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in (*net.named_parameters(), *net.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Engines:
    """The engines of one network: by (input shape, weight digest), least recently used dropped."""

    def __init__(self):
        self.engines: "OrderedDict[Tuple, object]" = OrderedDict()
        self.state: Optional[Tuple] = None  # (storage, version) of every tensor when ``digest`` was taken
        self.digest: Optional[str] = None
        self.failed = False

    def weights_key(self, net: nn.Module) -> str:
        tensors = [*net.parameters(), *net.buffers()]
        state = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        if state != self.state:
            self.state, self.digest = state, weights_digest(net)
        return self.digest


class RuntimeInference:
    """For a network class: the CPU eval forward without autograd and without deep supervision runs on an
    inference runtime (module docstring); everything else runs the next class's forward."""

    def runtime_applies(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and not self.training
                and not torch.is_grad_enabled() and not self.decoder.deep_supervision and not is_compiling()
                and not _under_dispatch_mode() and backend() != "torch")

    def forward(self, x: torch.Tensor):
        engine = self._engine(x) if self.runtime_applies(x) else None
        return super().forward(x) if engine is None else engine(x)

    def _engine(self, x: torch.Tensor):
        cache: _Engines = self.__dict__.setdefault("_runtime_engines", _Engines())
        if cache.failed:
            return None
        key = (tuple(x.shape), cache.weights_key(self), backend(), precision())
        engine = cache.engines.get(key)
        if engine is None:
            engine = self._build(x, key[2], key[3])
            if engine is None:
                cache.failed = True
                return None
            cache.engines[key] = engine
            while len(cache.engines) > MAX_ENGINES:
                cache.engines.popitem(last=False)
        cache.engines.move_to_end(key)
        return engine

    def _build(self, x: torch.Tensor, backend_name: str, precision_name: str):
        try:
            from nnunetv2_lgms.deploy import engines
        except ImportError as e:  # (the package's own module missing would be a bug; report it the same way)
            _warn_once("import", f"CPU inference runs the PyTorch reference: {e}")
            return None
        try:
            return engines.engine_for(engines.reference_network(self), x, backend_name,
                                      threads=torch.get_num_threads(), precision=precision_name)
        except engines.RuntimeUnavailable as e:
            _warn_once("unavailable", f"CPU inference runs the PyTorch reference: {e}")
        except Exception as e:  # noqa: BLE001 - any conversion failure: this network stays in PyTorch
            _warn_once(f"failed-{type(self).__name__}",
                       f"CPU inference runs the PyTorch reference: {backend_name} could not convert "
                       f"{type(self).__name__} ({type(e).__name__}: {e})")
        return None

    def __getstate__(self):  # deepcopy / pickling: the engines belong to the original
        getstate = getattr(super(), "__getstate__", None)
        state = dict(getstate() if getstate is not None else self.__dict__)
        state.pop("_runtime_engines", None)
        return state


@register(lgmsnet.LGMSNet, "cpu_inference")
class RuntimeLGMSNet(RuntimeInference, lgmsnet.LGMSNet):
    pass


@register(glims.GLIMS, "cpu_inference")
class RuntimeGLIMS(RuntimeInference, glims.GLIMS):
    pass
