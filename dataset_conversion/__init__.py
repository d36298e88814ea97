"""Dataset converters: each public release, read exactly as published, to an nnU-Net v2 raw dataset.

Command line: ``nnunetv2_lgms convert NAME SOURCE_DIR [--id N] [--resize S] [--paper-splits] [--overwrite] [-np N]``.
Python::

    from nnunetv2_lgms.dataset_conversion import convert
    result = convert("kvasir", "/data/Kvasir-SEG", resize=256)
"""
from __future__ import annotations

import importlib

from .core import ConversionError, Result

#: CLI name -> module (relative to this package)
CONVERTERS = {
    "busi": "busi",
    "isic2018": "isic2018",
    "kvasir": "kvasir",
    "tnscui": "tnscui",
    "btcv": "btcv",
    "kits23": "kits23",
    "cvc-clinicdb": "cvc_clinicdb",
    "cvc-300": "cvc_300",
    "ph2": "ph2",
    "bus": "bus",
    "folder": "folder",
}


def get_module(name: str):
    if name not in CONVERTERS:
        raise ConversionError(f"unknown dataset {name!r}; choose one of {', '.join(CONVERTERS)}")
    return importlib.import_module(f"{__name__}.{CONVERTERS[name]}")


def convert(name: str, source, **kwargs) -> Result:
    """Convert one dataset; see :func:`core.convert` for the keyword arguments."""
    from .core import convert as _convert

    return _convert(get_module(name), source, **kwargs)


__all__ = ["CONVERTERS", "ConversionError", "Result", "convert", "get_module"]
