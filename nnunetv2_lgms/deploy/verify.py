"""Does a runtime compute what torch computes, and if not, where does it stop doing so?

:func:`compare` runs a reference network and an :class:`~nnunetv2_lgms.deploy.engines.Engine` on fresh random
inputs (not the conversion example, so values a trace froze from the example show up) and measures the largest
logit difference against a tolerance relative to the logits' scale.

When they differ, :func:`locate_divergence` finds the module responsible: level by level from the top, it records
the submodules' inputs and outputs in two torch forwards, converts each submodule on its own (traced on the first
forward's inputs, checked on the second's), and descends into the first one, in call order, that fails to convert
or disagrees, until none of a module's children fails alone: then the ops in that module's own ``forward`` are the
culprits. Modules whose
calls cannot be isolated (keyword or non-tensor arguments, non-tensor results) are looked into rather than tested.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnunetv2_lgms.deploy import engines
from nnunetv2_lgms.deploy.manifest import DEFAULT_TOLERANCE


def tolerance_for(reference: np.ndarray, relative: float) -> float:
    return relative * max(1.0, float(np.abs(reference).max(initial=0.0)))


@dataclass
class Comparison:
    max_abs_diff: float
    tolerance: float
    batch_sizes: Tuple[int, ...]

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff <= self.tolerance)  # False for NaN too

    def as_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "batch_sizes": list(self.batch_sizes)}


def compare(reference: nn.Module, engine, input_shape: Sequence[int], relative_tolerance: float = DEFAULT_TOLERANCE,
            batch_sizes: Sequence[int] = (1, 2), seed: int = 1) -> Comparison:
    """Largest |engine - reference| over random inputs of ``input_shape`` (channels and spatial axes) at each batch
    size, against ``relative_tolerance`` times the reference's largest |logit| (at least 1)."""
    generator = torch.Generator().manual_seed(seed)
    worst, tolerance = 0.0, float("inf")
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape, generator=generator)
        with torch.no_grad():
            expected = reference(x).float().numpy()
        got = engine(x).numpy()
        if got.shape != expected.shape:
            return Comparison(float("inf"), 0.0, tuple(batch_sizes))
        worst = max(worst, float(np.abs(got - expected).max(initial=0.0)))
        if np.isnan(got).any() and not np.isnan(expected).any():
            worst = float("nan")
        tolerance = min(tolerance, tolerance_for(expected, relative_tolerance))
    return Comparison(worst, tolerance, tuple(batch_sizes))


# ---- locating a divergence -------------------------------------------------------------------------------------

Runner = Callable[[nn.Module, Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]], List[np.ndarray]]


def _flatten(value) -> Optional[List[torch.Tensor]]:
    """A tensor or a (nested) tuple/list of tensors as a flat list; None for anything else."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        flat = []
        for item in value:
            sub = _flatten(item)
            if sub is None:
                return None
            flat += sub
        return flat
    return None


def _run_openvino(module: nn.Module, trace_args, check_args) -> List[np.ndarray]:
    ov = engines._require("openvino")
    with torch.no_grad(), engines.quiet_conversion():
        traced = torch.jit.trace(module, trace_args, check_trace=False)
    model = ov.convert_model(traced, example_input=trace_args)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled([a.numpy() for a in check_args])
    return [np.asarray(result[i]) for i in range(len(compiled.outputs))]


def _run_onnxruntime(module: nn.Module, trace_args, check_args) -> List[np.ndarray]:
    ort = engines._require("onnxruntime")
    engines._require("onnx-export")
    with torch.no_grad(), engines.quiet_conversion():
        program = torch.onnx.export(module, tuple(trace_args), dynamo=True, optimize=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != len(check_args):  # the exporter dropped an unused input: feed by position is impossible
        raise _Uncheckable()
    return session.run(None, {i.name: a.numpy() for i, a in zip(inputs, check_args)})


RUNNERS: Dict[str, Runner] = {"openvino": _run_openvino, "onnxruntime": _run_onnxruntime}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# the line of a converter's message that names the op (OpenVINO: "No conversion rule found for operations: ...",
# torch.onnx: "No ONNX function found for <OpOverload(op='...')>"), else its first line
_OP_LINE = re.compile(r"no conversion rule|no onnx function|unsupported|not supported|not implemented", re.I)


def summarize_error(error: BaseException) -> str:
    """``Type: the line that names the op`` of a conversion error (converters' messages run to pages)."""
    lines = [line.strip(" -") for line in _ANSI.sub("", str(error)).splitlines() if line.strip(" -")]
    named = [line for line in lines if _OP_LINE.search(line)]
    return f"{type(error).__name__}: {(named or lines or [''])[0]}"


class _Uncheckable(Exception):
    """This module's call cannot be converted on its own (not a failure of the runtime)."""


@dataclass
class Divergence:
    """Where a conversion stops matching torch: the deepest module that fails on its own."""
    module: str  # qualified name, "" for the whole network
    module_class: str
    reason: str
    own_code: bool  # no child fails alone: the ops written in this module's forward are the culprits

    def describe(self) -> str:
        where = f"module `{self.module}` ({self.module_class})" if self.module else f"the network ({self.module_class})"
        if self.own_code:
            return (f"{where}: {self.reason}; none of its submodules fails on its own, so the ops in its own "
                    f"forward() are the cause")
        return f"{where}: {self.reason}"


@dataclass
class _Call:
    args: Tuple[torch.Tensor, ...]
    outputs: List[torch.Tensor]


def _record_calls(net: nn.Module, x: torch.Tensor, names: Optional[Sequence[str]] = None
                  ) -> Tuple[Dict[str, Optional[_Call]], List[str]]:
    """One forward of ``net``: the names of all submodules in the order of their first call, and for the first call
    of each of ``names`` its tensor arguments and flattened outputs (None where that call cannot be isolated).
    Only the modules asked for keep tensors, so memory stays at one level of the module tree."""
    calls: Dict[str, Optional[_Call]] = {}
    order: List[str] = []
    seen = set()
    wanted = set(names or ())
    handles = []

    def hook(name):
        def record(module, args, kwargs, output):
            if name in seen:
                return
            seen.add(name)
            order.append(name)
            if name not in wanted:
                return
            outputs = _flatten(output)
            if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args) or not outputs:
                calls[name] = None
            else:
                calls[name] = _Call(tuple(a.detach().clone() for a in args), [o.detach().clone() for o in outputs])
        return record

    for name, module in net.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return calls, order


def _failure(runner: Runner, module: nn.Module, first: _Call, second: _Call,
             relative_tolerance: float) -> Optional[str]:
    """Why ``module`` does not reproduce torch on its own, or None when it does (or cannot be tested)."""
    try:
        got = runner(module, first.args, second.args)
    except _Uncheckable:
        return None
    except Exception as e:  # noqa: BLE001 - any converter/runtime error is the finding
        return f"conversion failed: {summarize_error(e)}"
    if len(got) != len(second.outputs):
        return None
    worst, tolerance = 0.0, float("inf")
    for g, expected in zip(got, second.outputs):
        expected = expected.float().numpy()
        if tuple(np.shape(g)) != expected.shape:
            return f"output shape {tuple(np.shape(g))} instead of {expected.shape}"
        worst = max(worst, float(np.abs(np.asarray(g, np.float32) - expected).max(initial=0.0)))
        tolerance = min(tolerance, tolerance_for(expected, relative_tolerance))
    if not worst <= tolerance:
        return f"max |difference| {worst:.3g} against torch > tolerance {tolerance:.3g}"
    return None


def locate_divergence(net: nn.Module, input_shape: Sequence[int], backend: str,
                      relative_tolerance: float = DEFAULT_TOLERANCE, reason: str = "differs from torch",
                      seed: int = 2) -> Divergence:
    """The deepest module of ``net`` (eval mode, reference form) that fails on ``backend`` on its own; see the
    module docstring. ``reason`` describes the whole network's failure, reported if no submodule fails alone."""
    runner = RUNNERS[backend]
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(1, *input_shape, generator=generator) for _ in range(2)]  # trace on one, check on the other
    _, order = _record_calls(net, inputs[0])
    modules = dict(net.named_modules())
    rank = {name: i for i, name in enumerate(order)}

    def children(prefix: str) -> List[str]:
        """The called submodules directly below ``prefix``, looking through containers that are never called
        themselves (ModuleList, ModuleDict), in call order."""
        found = []
        for n, _ in modules[prefix].named_children():
            name = f"{prefix}.{n}" if prefix else n
            if name not in modules:  # registered under another name too (e.g. nnU-Net's decoder.encoder)
                continue
            found += [name] if name in rank else children(name)
        return sorted(found, key=rank.__getitem__)

    def first_failing(prefix: str) -> Optional[Divergence]:
        names = children(prefix)
        first_calls, second_calls = (_record_calls(net, x, names)[0] for x in inputs)
        for name in names:
            first, second = first_calls.get(name), second_calls.get(name)
            if first is None or second is None:  # cannot be run alone: look inside
                found = first_failing(name)
                if found is not None:
                    return found
                continue
            why = _failure(runner, modules[name], first, second, relative_tolerance)
            if why is not None:
                return first_failing(name) or Divergence(name, type(modules[name]).__name__, why,
                                                         own_code=bool(children(name)))
        return None

    found = first_failing("")
    return found or Divergence("", type(net).__name__, reason, own_code=bool(children("")))


__all__ = ["DEFAULT_TOLERANCE", "Comparison", "Divergence", "RUNNERS", "compare", "locate_divergence",
           "summarize_error", "tolerance_for"]
