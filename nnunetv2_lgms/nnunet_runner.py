"""Run the stock ``nnUNetv2_*`` console scripts as subprocesses in a self-contained nnU-Net environment.

The demo and the end-to-end tests go through the same commands a user types, so what they show is what users get.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from nnunetv2_lgms.discovery import ENV_VAR, ext_trainer_value


def nnunet_env(root: os.PathLike, device: str = "cpu", base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment with nnU-Net's three folders under ``root`` and our trainers on ``nnUNet_extTrainer``.

    On CPU, ``nnUNet_compile=f`` (compile is never used there anyway) and at most 2 worker processes for export,
    unless the caller's environment says otherwise."""
    env = dict(os.environ if base is None else base)
    root = Path(root)
    for var, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                     ("nnUNet_results", "nnUNet_results")):
        env[var] = str(root / sub)
        (root / sub).mkdir(parents=True, exist_ok=True)
    env[ENV_VAR] = ext_trainer_value(env.get(ENV_VAR))
    if device == "cpu":
        env.setdefault("nnUNet_compile", "f")
        env.setdefault("nnUNet_def_n_proc", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def console_script(name: str) -> str:
    """Path of an nnU-Net console script of *this* environment (not whatever another env put on PATH)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH; is nnunetv2 installed?")
    return found


class CommandFailed(RuntimeError):
    pass


def run_nnunet(args: Sequence[str], env: Dict[str, str], log_file: os.PathLike,
               on_line: Optional[Callable[[str], None]] = None) -> float:
    """Run ``args`` (first item an nnU-Net console script name), log all output to ``log_file``, pass each line to
    ``on_line``; return the wall time in seconds. Raises :class:`CommandFailed` with the log's tail on failure."""
    cmd = [console_script(args[0]), *map(str, args[1:])]
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_file, "a", buffering=1) as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        tail: List[str] = []
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line])[-40:]
            if on_line:
                on_line(line.rstrip("\n"))
        rc = proc.wait()
    if rc != 0:
        raise CommandFailed(f"{' '.join(cmd)} failed (exit {rc}); full log: {log_file}\n" + "".join(tail))
    return time.perf_counter() - start


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ")


class EpochReporter:
    """Condenses nnU-Net's training log to one line per epoch: ``epoch 3/8  train_loss ...  pseudo Dice ...``."""

    def __init__(self, prefix: str, num_epochs: Optional[int] = None, printer: Callable[[str], None] = print):
        self.prefix, self.num_epochs, self.printer = prefix, num_epochs, printer
        self.current: Dict[str, str] = {}

    def __call__(self, line: str) -> None:
        line = _TIMESTAMP.sub("", line).strip()
        if m := re.match(r"Epoch (\d+)$", line):
            self.current = {"epoch": m.group(1)}
        elif m := re.match(r"(train_loss|val_loss) (\S+)", line):
            self.current[m.group(1)] = m.group(2)
        elif line.startswith("Pseudo dice"):
            self.current["dice"] = ", ".join(f"{float(v):.3f}" for v in re.findall(r"[-\d.]+(?=\))", line)) or line[12:]
        elif m := re.match(r"Epoch time: (\S+) s", line):
            total = f"/{self.num_epochs}" if self.num_epochs else ""
            c = self.current
            self.printer(f"{self.prefix} epoch {int(c.get('epoch', 0)) + 1}{total}: train_loss {c.get('train_loss', '?')}"
                         f", val_loss {c.get('val_loss', '?')}, pseudo Dice {c.get('dice', '?')} ({m.group(1)} s)")
        elif line.startswith("Mean Validation Dice"):
            self.printer(f"{self.prefix} {line}")
