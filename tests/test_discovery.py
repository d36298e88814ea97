"""Stock nnU-Net finds our trainers through nnUNet_extTrainer set exactly as ``nnunetv2_lgms env`` prints it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import nnunetv2_lgms.trainers as ours
from nnunetv2_lgms.discovery import SHIM_FOLDER, ext_trainer_value

BIN = Path(sys.executable).parent


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def test_env_prints_an_export_that_appends_to_an_existing_value():
    out = subprocess.run([BIN / "nnunetv2_lgms", "env"], env=_clean_env(nnUNet_extTrainer="/opt/other"),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"export nnUNet_extTrainer=/opt/other{os.pathsep}{SHIM_FOLDER}"
    # idempotent: running it twice does not add the folder twice
    assert ext_trainer_value(f"/opt/other{os.pathsep}{SHIM_FOLDER}") == f"/opt/other{os.pathsep}{SHIM_FOLDER}"


LOOKUP = """
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
import nnunetv2_lgms.trainers as ours
for name in ours.__all__:
    cls = recursive_find_trainer_class_by_name(name)
    assert cls is getattr(ours, name), (name, cls)
print("found", len(ours.__all__))
"""


def test_stock_lookup_returns_our_canonical_classes_after_eval_env():
    script = f'eval "$(nnunetv2_lgms env)" && "{sys.executable}" -c \'{LOOKUP}\''
    result = subprocess.run(["bash", "-c", script], env=_clean_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"found {len(ours.__all__)}" in result.stdout


def test_without_the_env_var_the_stock_lookup_fails():
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
            "f('nnUNetTrainerLGMSNet')")
    result = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True)
    assert result.returncode != 0 and "Could not find requested nnunet trainer" in result.stderr


def test_no_trainer_name_collides_with_a_builtin():
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer")
    for name in ours.__all__:
        assert recursive_find_python_class(folder, name, "nnunetv2.training.nnUNetTrainer") is None, name


def test_shim_folder_ships_only_reexports():
    modules = sorted(p.relative_to(SHIM_FOLDER).as_posix() for p in SHIM_FOLDER.rglob("*.py"))
    assert modules == ["nnunetv2_lgms_ext/__init__.py", "nnunetv2_lgms_ext/trainers.py"]
    code = (SHIM_FOLDER / "nnunetv2_lgms_ext" / "trainers.py").read_text()
    statements = [l for l in code.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert statements == ["from nnunetv2_lgms.trainers import *  # noqa: F401,F403"]


def test_trainers_keep_nnunet_init_and_build_signatures():
    import inspect

    for name in ours.__all__:
        cls = getattr(ours, name)
        assert list(inspect.signature(cls.__init__).parameters) == \
            ["self", "plans", "configuration", "fold", "dataset_json", "device"], name
        build = inspect.signature(cls.build_network_architecture)
        assert list(build.parameters) == ["plans_manager", "configuration_manager", "num_input_channels",
                                          "num_output_channels", "enable_deep_supervision"], name
        assert isinstance(inspect.getattr_static(cls, "build_network_architecture"), staticmethod), name


@pytest.mark.parametrize("env_ok", [True, False])
def test_doctor_reports_the_lookup(tmp_path, env_ok):
    env = _clean_env(**{v: str(tmp_path) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    if env_ok:
        env["nnUNet_extTrainer"] = str(SHIM_FOLDER)
    result = subprocess.run([BIN / "nnunetv2_lgms", "doctor"], env=env, capture_output=True, text=True)
    if env_ok:
        assert result.returncode == 0, result.stdout
        assert "[ ok ] trainer lookup: nnUNetTrainerLGMSNet -> nnunetv2_lgms.trainers.nnUNetTrainerLGMSNet" in result.stdout
    else:
        assert result.returncode == 1
        assert "[FAIL] nnUNet_extTrainer" in result.stdout and 'eval "$(nnunetv2_lgms env)"' in result.stdout
