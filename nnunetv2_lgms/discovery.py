"""Where nnU-Net's ``nnUNet_extTrainer`` lookup must point to find this plugin's trainers."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

ENV_VAR = "nnUNet_extTrainer"
SHIM_FOLDER = Path(__file__).resolve().parent / "_ext_trainers"


def ext_trainer_value(existing: Optional[str]) -> str:
    """``existing`` with our shim folder appended (``os.pathsep``-separated); unchanged if already present."""
    paths = [p for p in (existing or "").split(os.pathsep) if p]
    if any(_same_path(p, SHIM_FOLDER) for p in paths):
        return os.pathsep.join(paths)
    return os.pathsep.join(paths + [str(SHIM_FOLDER)])


def shim_on_path(value: Optional[str]) -> bool:
    return any(_same_path(p, SHIM_FOLDER) for p in (value or "").split(os.pathsep) if p)


def _same_path(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b
    except OSError:
        return False
