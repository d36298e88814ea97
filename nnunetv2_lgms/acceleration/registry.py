"""Which accelerated class stands in for which reference class, and for which setting.

An accelerated class subclasses its reference class, adds no parameters or buffers, and overrides ``forward`` (or a
method the reference calls) only; it opens with one guard that hands the call to ``super()`` where it does not
apply. :func:`swap_class` changes a module's ``__class__`` in place, so parameters, buffers, hooks and state-dict
keys stay what they are, and the same checkpoint loads with acceleration on or off.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple, Type

from torch import nn

#: the settings, each with what it serves
SETTINGS = {
    "cpu_training": "eager CPU kernels for training steps (autograd on, float32/64, no autocast, not compiled)",
    "cpu_inference": "CPU inference through an inference runtime (OpenVINO), eval mode, no autograd",
    "cuda_inference": "CUDA-graph replay of the eval forward without autograd",
}

#: (reference class, setting) -> accelerated class
_REGISTRY: Dict[Tuple[type, str], type] = {}
#: every class accelerate() may install (registered or combined) -> its reference class
_REFERENCE_OF: Dict[type, type] = {}
_COMBINED: Dict[Tuple[type, ...], type] = {}


def register(reference: Type[nn.Module], setting: str):
    """Class decorator: the decorated subclass of ``reference`` stands in for it under ``setting``."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")

    def decorate(cls):
        if not issubclass(cls, reference):
            raise TypeError(f"{cls.__name__} must subclass {reference.__name__}")
        if (reference, setting) in _REGISTRY:
            raise ValueError(f"{reference.__name__} already has an accelerated class for {setting}: "
                             f"{_REGISTRY[reference, setting].__name__}")
        _REGISTRY[reference, setting] = cls
        _REFERENCE_OF[cls] = reference
        return cls

    return decorate


def registered() -> Dict[Tuple[type, str], type]:
    """A copy of the registry: ``(reference class, setting) -> accelerated class``."""
    return dict(_REGISTRY)


def accelerated_class(reference: type, settings: Iterable[str]):
    """The class a module of exact class ``reference`` becomes under ``settings``, or None. Several settings'
    classes are combined into one subclass (method resolution order: the order of ``SETTINGS``), each guard handing
    on to the next and finally to the reference."""
    classes = tuple(_REGISTRY[reference, s] for s in SETTINGS if s in settings and (reference, s) in _REGISTRY)
    if not classes:
        return None
    if len(classes) == 1:
        return classes[0]
    combined = _COMBINED.get(classes)
    if combined is None:
        combined = type(reference.__name__, classes, {"__module__": __name__, "__qualname__": reference.__name__})
        _COMBINED[classes] = combined
        _REFERENCE_OF[combined] = reference
    return combined


def reference_class(cls: type) -> type:
    """``cls``'s reference class (``cls`` itself for a class accelerate() does not install)."""
    return _REFERENCE_OF.get(cls, cls)


def component_names(cls: type) -> Tuple[str, ...]:
    """``module.Class`` of each registered class in ``cls`` (several for a combined class)."""
    parts = cls.__bases__ if cls in _COMBINED.values() else (cls,)
    return tuple(f"{c.__module__.rsplit('.', 1)[-1]}.{c.__qualname__}" for c in parts)


def is_accelerated(cls: type) -> bool:
    return cls in _REFERENCE_OF


def swap_class(module: nn.Module, cls: type) -> None:
    module.__class__ = cls
