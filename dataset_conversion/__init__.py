"""Dataset converters: each public release, read exactly as published, to an nnU-Net v2 raw dataset.

Command line: ``nnunetv2_lgms convert NAME SOURCE_DIR [--id N] [--resize S] [--paper-splits] [--overwrite] [-np N]``.
Python::

    from nnunetv2_lgms.dataset_conversion import convert
    result = convert("kvasir", "/data/Kvasir-SEG", resize=256)

Registration: every module of this package that defines ``SPEC`` (a :class:`core.DatasetSpec`) is a converter, named
on the command line by ``SPEC.key`` and listed in ``SPEC.default_id`` order. Adding ``mydata.py`` with a ``SPEC`` and
a ``find_cases`` is all it takes for ``nnunetv2_lgms convert mydata`` and its entry in ``convert --help``.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict

from .core import ConversionError, DatasetSpec, Result, has_paper_splits

_registry: Dict[str, str] = {}  # CLI name -> module name (relative to this package), filled on first use


def converters() -> Dict[str, str]:
    """CLI name -> module name (relative to this package) of every converter module, i.e. every module defining a
    ``SPEC``, ordered by default dataset ID. Found once per process by importing the package's modules (cached)."""
    if not _registry:
        found = {}
        for info in pkgutil.iter_modules(__path__):
            if info.ispkg or info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            spec = getattr(module, "SPEC", None)
            if not isinstance(spec, DatasetSpec):
                continue  # shared code (core, io2d, nifti)
            if spec.key in found:
                raise ConversionError(f"two converter modules declare the dataset name {spec.key!r}: "
                                      f"{found[spec.key][1]}.py and {info.name}.py (give each SPEC its own key)")
            found[spec.key] = (spec.default_id, info.name)
        _registry.update({key: mod for key, (_, mod) in sorted(found.items(), key=lambda kv: (kv[1][0], kv[0]))})
    return dict(_registry)


def specs() -> Dict[str, DatasetSpec]:
    """CLI name -> ``SPEC`` of every converter, in the order of :func:`converters`."""
    return {key: importlib.import_module(f"{__name__}.{mod}").SPEC for key, mod in converters().items()}


def get_module(name: str):
    names = converters()
    if name not in names:
        raise ConversionError(f"unknown dataset {name!r}; choose one of {', '.join(names)}")
    return importlib.import_module(f"{__name__}.{names[name]}")


def convert(name: str, source, **kwargs) -> Result:
    """Convert one dataset; see :func:`core.convert` for the keyword arguments."""
    from .core import convert as _convert

    return _convert(get_module(name), source, **kwargs)


def __getattr__(name: str):
    if name == "CONVERTERS":  # kept for callers of the former hand-written table
        return converters()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CONVERTERS", "ConversionError", "DatasetSpec", "Result", "convert", "converters", "get_module",
           "has_paper_splits", "specs"]
