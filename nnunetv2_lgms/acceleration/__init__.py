"""Speed for the reference networks, attached from outside at build time.

``accelerate(net)`` swaps the class of every module that has a registered accelerated subclass (same parameters,
buffers and state dict; :mod:`~nnunetv2_lgms.acceleration.registry`) and returns a report of what it swapped.
The accelerated classes decide at each call whether their path applies (device, autograd, dtype, compile) and
otherwise run the reference forward, so one network serves training, validation and prediction on any device.

Settings (:data:`~nnunetv2_lgms.acceleration.registry.SETTINGS`): ``cpu_training``, ``cpu_inference``,
``cuda_inference``. ``accelerate(net, settings)`` takes a list of them, ``"all"`` (the default) or ``"none"``; the
environment variable ``nnUNet_lgms_acceleration`` overrides the default for a whole run (``none``/``off``/``0``:
the plain reference everywhere, e.g. ``nnUNet_lgms_acceleration=none nnUNetv2_predict ...``; or a comma-separated
list of settings). :func:`to_reference` swaps every class back.
"""
from __future__ import annotations

import collections
import copy
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Tuple, Union

from torch import nn

from nnunetv2_lgms.acceleration.registry import (SETTINGS, accelerated_class, component_names, is_accelerated,
                                                 reference_class, registered, swap_class)

ENV_VAR = "nnUNet_lgms_acceleration"
_OFF = ("none", "off", "0", "false", "no", "reference")


@dataclass
class AccelerationReport:
    """What :func:`accelerate` swapped: per reference class and the accelerated classes standing in for it, how
    many modules."""
    settings: Tuple[str, ...]
    swapped: Dict[Tuple[str, Tuple[str, ...]], int] = field(default_factory=collections.Counter)

    def __str__(self) -> str:
        if not self.swapped:
            return f"acceleration ({', '.join(self.settings) or 'none'}): nothing swapped"
        lines = [f"acceleration ({', '.join(self.settings)}):"]
        lines += [f"  {ref} x{n}: {', '.join(classes)}" for (ref, classes), n in sorted(self.swapped.items())]
        return "\n".join(lines)


def resolve_settings(settings: Union[str, Iterable[str], None] = "all") -> Tuple[str, ...]:
    """``"all"``, ``"none"`` or an iterable of setting names -> a tuple of setting names. With ``"all"`` the
    environment variable ``nnUNet_lgms_acceleration``, where set, decides."""
    if settings is None or settings == "all":
        settings = os.environ.get(ENV_VAR, "all").strip().lower() or "all"
        if settings == "all":
            return tuple(SETTINGS)
        if settings in _OFF:
            return ()
        settings = [s.strip() for s in settings.split(",") if s.strip()]
    elif isinstance(settings, str):
        settings = () if settings.lower() in _OFF else [settings]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown acceleration setting(s) {unknown} (from {ENV_VAR} or the caller); known: "
                         f"{', '.join(SETTINGS)}, or 'all' / 'none'")
    return tuple(s for s in SETTINGS if s in settings)


def _load_accelerated_classes() -> None:
    # importing the modules registers their classes
    from nnunetv2_lgms.acceleration import cpu_training, cuda_graphs, runtime  # noqa: F401


def accelerate(net: nn.Module, settings: Union[str, Iterable[str], None] = "all"
               ) -> Tuple[nn.Module, AccelerationReport]:
    """Swap, in place, every module of ``net`` whose exact class has an accelerated class under ``settings``
    (a module already accelerated is first returned to its reference). Returns ``net`` and the report."""
    _load_accelerated_classes()
    resolved = resolve_settings(settings)
    report = AccelerationReport(resolved)
    for module in net.modules():
        reference = reference_class(type(module))
        cls = accelerated_class(reference, resolved) or reference
        if cls is not type(module):
            swap_class(module, cls)
        if cls is not reference:
            report.swapped[reference.__name__, component_names(cls)] += 1
    return net, report


def to_reference(net: nn.Module) -> nn.Module:
    """Swap every accelerated module of ``net`` back to its reference class, in place; returns ``net``."""
    for module in net.modules():
        if is_accelerated(type(module)):
            swap_class(module, reference_class(type(module)))
    return net


def reference_copy(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` with every module in its reference class (``net`` untouched)."""
    return to_reference(copy.deepcopy(net))


def accelerated_modules(net: nn.Module) -> List[nn.Module]:
    return [m for m in net.modules() if is_accelerated(type(m))]


__all__ = ["ENV_VAR", "SETTINGS", "AccelerationReport", "accelerate", "accelerated_modules", "reference_copy",
           "registered", "resolve_settings", "to_reference"]
