"""The converters live in the top-level ``dataset_conversion/`` folder and install as
``nnunetv2_lgms.dataset_conversion`` (pyproject ``package-dir``), with the paper's split lists as package data."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = ["__init__", "core", "io2d", "nifti", "busi", "isic2018", "kvasir", "tnscui", "btcv", "kits23",
           "cvc_clinicdb", "cvc_300", "ph2", "bus", "folder"]


def test_every_subpackage_is_listed_in_pyproject():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    assert cfg["package-dir"]["nnunetv2_lgms.dataset_conversion"] == "dataset_conversion"
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "nnunetv2_lgms").rglob("*.py")
             if "__pycache__" not in p.parts}
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert {f"dataset_conversion/{m}.py" for m in MODULES} <= {
        str(p.relative_to(REPO)) for p in (REPO / "dataset_conversion").glob("*.py")}


def test_installed_package_imports_with_split_lists():
    import nnunetv2_lgms.dataset_conversion as dc
    from nnunetv2_lgms.dataset_conversion import core

    assert Path(dc.__file__).parent.name == "dataset_conversion"
    assert len(list(core.SPLITS_DIR.glob("*.txt"))) == 18


def test_wheel_ships_converters_and_split_lists(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # build from a copy so that no build/ folder lands in the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    for name in ("nnunetv2_lgms", "dataset_conversion"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip"]
    out = tmp_path / "whl"
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)], check=True,
                   capture_output=True)
    wheel = next(out.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for m in MODULES:
        assert f"nnunetv2_lgms/dataset_conversion/{m}.py" in names
    assert len([n for n in names if n.startswith("nnunetv2_lgms/dataset_conversion/splits/")]) == 18
    assert "nnunetv2_lgms/commands/convert.py" in names
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True,
                   capture_output=True)
    code = ("import nnunetv2_lgms.dataset_conversion as d, nnunetv2_lgms.dataset_conversion.core as c;"
            "print(d.__file__); print(len(list(c.SPLITS_DIR.glob('*.txt'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(target)))
    file, count = res.stdout.split()
    assert file.startswith(str(target)) and count == "18"
