"""``nnunetv2_lgms doctor``: check that stock ``nnUNetv2_*`` commands will find and run our trainers, and say how
to fix what is wrong. Exit code 0 when nothing failed (warnings allowed), 1 otherwise."""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List

TESTED_TORCH = "2.14.1"
TESTED_TORCHVISION = "0.29.1"


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn", "fail"
    detail: str
    fix: str = ""


def add_arguments(parser) -> None:
    parser.add_argument("--trainer", default="nnUNetTrainerLGMSNet", help="trainer name to look up (default: %(default)s)")


def _version(dist: str):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def check_versions() -> List[Check]:
    from packaging.version import Version

    checks = []
    nnunet = _version("nnunetv2")
    if nnunet is None:
        checks.append(Check("nnunetv2", "fail", "not installed", "pip install 'nnunetv2>=2.8,<2.9'"))
    elif not Version("2.8") <= Version(nnunet) < Version("2.9"):
        checks.append(Check("nnunetv2", "fail", f"{nnunet} installed; this plugin needs >=2.8,<2.9 "
                            "(nnUNet_extTrainer lookup and the 2.7+ build_network_architecture signature)",
                            "pip install 'nnunetv2>=2.8,<2.9'"))
    else:
        checks.append(Check("nnunetv2", "ok", nnunet))
    torch_v, tv_v = _version("torch"), _version("torchvision")
    pair = f"torch {torch_v}, torchvision {tv_v}"
    if torch_v is None:
        checks.append(Check("torch", "fail", "not installed", f"pip install torch=={TESTED_TORCH} torchvision=={TESTED_TORCHVISION}"))
    else:
        try:
            import timm  # noqa: F401  nnU-Net's trainer search imports it; a torch/torchvision mismatch breaks it
            import torchvision  # noqa: F401
            status = "ok" if (torch_v.split("+")[0], (tv_v or "").split("+")[0]) == (TESTED_TORCH, TESTED_TORCHVISION) else "warn"
            checks.append(Check("torch", status, pair + ("" if status == "ok" else f" (tested: {TESTED_TORCH}/{TESTED_TORCHVISION})")))
        except Exception as e:  # noqa: BLE001 - any import failure here is the finding
            checks.append(Check("torch", "fail", f"{pair}: importing timm/torchvision fails ({type(e).__name__}: {e})",
                                f"install a matching pair: pip install torch=={TESTED_TORCH} torchvision=={TESTED_TORCHVISION}"))
    return checks


def check_paths() -> List[Check]:
    checks = []
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(var)
        if not value:
            checks.append(Check(var, "warn", "not set", f"export {var}=/path/to/{var} (nnU-Net needs it to train)"))
        elif not Path(value).is_dir():
            checks.append(Check(var, "warn", f"{value} does not exist", f"mkdir -p {value}"))
        else:
            checks.append(Check(var, "ok", value))
    return checks


def check_lookup(trainer: str) -> List[Check]:
    from nnunetv2_lgms.discovery import ENV_VAR, SHIM_FOLDER, shim_on_path

    value = os.environ.get(ENV_VAR)
    fix = 'eval "$(nnunetv2_lgms env)"  (add it to your shell profile to keep it)'
    if not shim_on_path(value):
        return [Check(ENV_VAR, "fail", f"does not contain {SHIM_FOLDER} (value: {value!r})", fix)]
    checks = [Check(ENV_VAR, "ok", value)]
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        import nnunetv2_lgms.trainers as ours
        found = recursive_find_trainer_class_by_name(trainer)
    except Exception as e:  # noqa: BLE001
        checks.append(Check("trainer lookup", "fail", f"{trainer}: {type(e).__name__}: {e}",
                            f"another folder on {ENV_VAR} may hold a module that fails to import; "
                            "nnU-Net aborts the whole search on any ImportError"))
        return checks
    if found is getattr(ours, trainer, None):
        checks.append(Check("trainer lookup", "ok", f"{trainer} -> {found.__module__}.{found.__name__}"))
    else:
        checks.append(Check("trainer lookup", "fail", f"{trainer} resolved to {found.__module__}.{found.__name__}, "
                            "not this plugin's class", f"remove the other definition from {ENV_VAR}"))
    return checks


def check_console_scripts() -> List[Check]:
    """nnUNetv2_train on PATH must run this interpreter (a stale one from another env is a common trap)."""
    script = shutil.which("nnUNetv2_train")
    if script is None:
        here = Path(sys.executable).parent / "nnUNetv2_train"
        detail = f"not on PATH ({here} exists)" if here.exists() else "not on PATH"
        return [Check("nnUNetv2_train", "fail", detail,
                      f"activate the environment: source {Path(sys.prefix) / 'bin' / 'activate'}")]
    try:
        first = Path(script).read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return [Check("nnUNetv2_train", "warn", f"{script}: cannot read its interpreter line")]
    interpreter = first[2:].strip().split()[0] if first.startswith("#!") else ""
    same = interpreter and Path(interpreter).resolve() == Path(sys.executable).resolve()
    if same or Path(script).resolve().parent == Path(sys.executable).resolve().parent:
        return [Check("nnUNetv2_train", "ok", script)]
    return [Check("nnUNetv2_train", "warn", f"{script} runs {interpreter or 'another interpreter'}, not {sys.executable}",
                  "activate this environment first, or call the nnUNetv2_train of this environment")]


def check_device() -> List[Check]:
    import torch
    if torch.cuda.is_available():
        return [Check("device", "ok", f"CUDA: {torch.cuda.get_device_name(0)}")]
    return [Check("device", "warn", "no CUDA device: use -device cpu (fine for smoke runs, far too slow for real training)")]


def run(args) -> int:
    checks = check_versions() + check_paths() + check_lookup(args.trainer) + check_console_scripts() + check_device()
    marks = {"ok": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]"}
    for c in checks:
        print(f"{marks[c.status]} {c.name}: {c.detail}")
        if c.fix and c.status != "ok":
            print(f"       fix: {c.fix}")
    failed = [c for c in checks if c.status == "fail"]
    print("\nAll required checks passed." if not failed else f"\n{len(failed)} check(s) failed.")
    return 1 if failed else 0
