"""CPU inference runtimes (OpenVINO, ONNX Runtime) for nnU-Net-style segmentation networks.

A network is converted from its *reference* form (:func:`reference_network`: plain module classes, eval mode, deep
supervision off), because the speed paths of this package's networks emit backend-specific ops that no converter
knows. The result is an :class:`Engine`: a float32 CPU tensor in, float32 CPU logits out, so it can stand in for the
network inside nnU-Net's sliding window. Everything stays float32 (OpenVINO would otherwise pick bf16 on CPUs that
have it).

The runtimes are optional (``pip install "nnunetv2_lgms[deploy]"``); they are imported on first use and a missing
one raises :class:`RuntimeUnavailable`.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import warnings
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch
from torch import nn

BACKENDS = ("openvino", "onnxruntime")
PRECISIONS = ("f32", "bf16")
INSTALL_HINT = 'pip install "nnunetv2_lgms[deploy]"'
INPUT_NAME, OUTPUT_NAME = "input", "logits"

# what each runtime needs, as (module, pip distribution)
_REQUIREMENTS = {
    "openvino": [("openvino", "openvino")],
    "onnxruntime": [("onnxruntime", "onnxruntime")],
    "onnx-export": [("onnx", "onnx"), ("onnxscript", "onnxscript")],
}


class RuntimeUnavailable(ImportError):
    """An inference runtime (or the ONNX exporter's dependencies) is not installed; the message names the fix."""


def _require(what: str):
    """Import what ``what`` needs and return the first module, or raise :class:`RuntimeUnavailable`."""
    modules = []
    for module, dist in _REQUIREMENTS[what]:
        try:
            modules.append(importlib.import_module(module))
        except ImportError as e:
            raise RuntimeUnavailable(f"{dist} is not installed in this environment ({e}); install the deploy extra: "
                                     f"{INSTALL_HINT}") from None
    return modules[0]


def available_backends() -> List[str]:
    """The runtimes of :data:`BACKENDS` that import here."""
    found = []
    for backend in BACKENDS:
        try:
            _require(backend)
        except RuntimeUnavailable:
            continue
        found.append(backend)
    return found


def reference_network(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` in eval mode with deep supervision off and every module in its plain reference class:
    the form a converter traces. ``net`` itself is untouched. Works for any nnU-Net network (nnU-Net's own
    ``PlainConvUNet`` is its own reference)."""
    net = getattr(net, "_orig_mod", net)  # torch.compile wrapper
    net = getattr(net, "module", net) if isinstance(net, nn.parallel.DistributedDataParallel) else net
    from nnunetv2_lgms.acceleration import reference_copy

    ref = reference_copy(net)
    decoder = getattr(ref, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = False
    return ref.eval()


@contextlib.contextmanager
def quiet_conversion():
    """Silence what tracing a fixed-size network always says: shape-dependent Python values become constants (the
    export check catches any that matter), the deprecation notice of ``torch.jit.trace``, and the ONNX exporter's
    progress lines."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def _check_eval(net: nn.Module) -> None:
    if net.training:
        raise ValueError("the network is in training mode; convert reference_network(net), which is in eval mode "
                         "(BatchNorm/dropout would be traced in their training behaviour otherwise)")


def _conversion_example(example: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    """float32 CPU example; batch 2 for a dynamic batch axis (torch.export specialises a batch of 1 to a constant)."""
    example = example.detach().to("cpu", torch.float32)
    if dynamic_batch and example.shape[0] == 1:
        example = example.expand(2, *example.shape[1:]).contiguous()
    return example


def openvino_model(net: nn.Module, example: torch.Tensor, dynamic_batch: bool = True):
    """``net`` (eval mode, normally :func:`reference_network`) as an ``openvino.Model`` with ``example``'s shape
    (batch axis dynamic unless ``dynamic_batch=False``).

    Traced with ``torch.jit.trace`` under ``torch.no_grad`` and converted from the trace: several times faster than
    handing the module to ``convert_model``, which traces with gradients on. Shape-dependent Python branches are
    fixed at the example's spatial size, which is the patch size nnU-Net always feeds."""
    ov = _require("openvino")
    _check_eval(net)
    x = _conversion_example(example, dynamic_batch)
    with torch.no_grad(), quiet_conversion():
        traced = torch.jit.trace(net, x, check_trace=False)
    shape = [-1 if dynamic_batch else x.shape[0], *x.shape[1:]]
    model = ov.convert_model(traced, example_input=x, input=[(ov.PartialShape(shape), ov.Type.f32)])
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    return model


def save_openvino(model, xml_path: Union[str, os.PathLike]) -> Path:
    """Write ``model`` as OpenVINO IR (``.xml`` + ``.bin``), weights kept in float32."""
    ov = _require("openvino")
    xml_path = Path(xml_path)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path


def _onnx_program(net: nn.Module, example: torch.Tensor, dynamic_batch: bool):
    _require("onnx-export")
    _check_eval(net)
    x = _conversion_example(example, dynamic_batch)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with torch.no_grad(), quiet_conversion():
        return torch.onnx.export(net, (x,), dynamo=True, dynamic_shapes=dynamic_shapes, input_names=[INPUT_NAME],
                                 output_names=[OUTPUT_NAME], optimize=True, verbose=False)


def export_onnx(net: nn.Module, example: torch.Tensor, path: Union[str, os.PathLike],
                dynamic_batch: bool = True) -> Path:
    """Write ``net`` (eval mode, normally :func:`reference_network`) as one self-contained ONNX file with torch's
    ``torch.export``-based exporter; input ``input``, output ``logits``, batch axis dynamic unless told otherwise."""
    program = _onnx_program(net, example, dynamic_batch)
    path = Path(path)
    program.save(str(path), external_data=False)
    return path


def onnx_bytes(net: nn.Module, example: torch.Tensor, dynamic_batch: bool = True) -> bytes:
    """:func:`export_onnx` into memory (a serialised ``ModelProto``)."""
    return _onnx_program(net, example, dynamic_batch).model_proto.SerializeToString()


class Engine:
    """A compiled network on a CPU runtime, called like the network: ``engine(x) -> logits``.

    Input and output are float32 CPU tensors; the batch axis is free when the model was built with a dynamic one.
    Not thread-safe (one inference request is reused), as nnU-Net calls its network from one thread."""

    backend: str = ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self._run(array)
        if not out.flags.writeable or not out.flags.c_contiguous:  # nnU-Net adds into the result in place
            out = np.array(out, copy=True)
        return torch.from_numpy(out)

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"


class OpenVINOEngine(Engine):
    backend = "openvino"

    def __init__(self, compiled):
        if len(compiled.outputs) != 1:
            raise ValueError(f"the model has {len(compiled.outputs)} outputs; export it with deep supervision off "
                             f"(reference_network does that)")
        self.compiled = compiled
        self._request = compiled.create_infer_request()

    def _run(self, x: np.ndarray) -> np.ndarray:
        self._request.infer({0: x})
        return self._request.get_output_tensor(0).data.copy()


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, session):
        if len(session.get_outputs()) != 1:
            raise ValueError(f"the model has {len(session.get_outputs())} outputs; export it with deep supervision "
                             f"off (reference_network does that)")
        self.session = session
        self._input = session.get_inputs()[0].name

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: x})[0]


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


def compile_openvino(model_or_xml_path, threads: Optional[int] = None, precision: str = "f32") -> Engine:
    """An :class:`Engine` on OpenVINO's CPU plugin from an ``openvino.Model`` or a model file (IR ``.xml`` or
    ``.onnx``), latency mode, ``threads`` inference threads (default: OpenVINO's choice). ``precision`` is the
    compute precision: ``f32`` (default; OpenVINO would pick bf16 by itself on CPUs that have it) or, opted into,
    ``bf16`` (inputs and outputs stay float32)."""
    ov = _require("openvino")
    _check_precision(precision)
    core = ov.Core()
    model = model_or_xml_path
    if isinstance(model, (str, os.PathLike)):
        model = core.read_model(str(model))
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return OpenVINOEngine(core.compile_model(model, "CPU", config))


def compile_onnxruntime(onnx_path_or_bytes, threads: Optional[int] = None, precision: str = "f32") -> Engine:
    """An :class:`Engine` on ONNX Runtime's CPU execution provider from an ``.onnx`` file or its bytes, all graph
    optimisations on, ``threads`` intra-op threads (default: ONNX Runtime's choice), sequential execution. Float32
    only (its CPU provider has no reduced-precision switch for a float32 model)."""
    _check_precision(precision)
    if precision != "f32":
        raise ValueError(f"ONNX Runtime runs these models in float32 only, not {precision}; use OpenVINO for bf16")
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    source = onnx_path_or_bytes
    if isinstance(source, (str, os.PathLike)):
        source = str(source)
    elif isinstance(source, io.BytesIO):
        source = source.getvalue()
    return OnnxRuntimeEngine(ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]))


def engine_for(net: nn.Module, example: torch.Tensor, backend: str = "openvino",
               threads: Optional[int] = None, precision: str = "f32") -> Engine:
    """Convert ``net`` (eval mode, normally :func:`reference_network`) in memory and compile it on ``backend``,
    batch axis dynamic. ``example`` fixes the other axes (nnU-Net: ``(1, channels, *patch_size)``); ``threads``
    and ``precision`` as for :func:`compile_openvino` / :func:`compile_onnxruntime`."""
    _check_precision(precision)
    if backend == "openvino":
        return compile_openvino(openvino_model(net, example, dynamic_batch=True), threads, precision)
    if backend == "onnxruntime":
        _require("onnxruntime")  # fail before the slow export
        if precision != "f32":
            raise ValueError(f"ONNX Runtime runs these models in float32 only, not {precision}; use OpenVINO for bf16")
        return compile_onnxruntime(onnx_bytes(net, example, dynamic_batch=True), threads)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "INSTALL_HINT", "PRECISIONS", "Engine", "OnnxRuntimeEngine", "OpenVINOEngine",
           "RuntimeUnavailable", "available_backends", "compile_onnxruntime", "compile_openvino", "engine_for",
           "export_onnx", "onnx_bytes", "openvino_model", "quiet_conversion", "reference_network", "save_openvino"]
