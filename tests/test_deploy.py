"""Deployment: export of trained folds to ONNX / OpenVINO and prediction through nnU-Net's own pipeline with the
network on ONNX Runtime / OpenVINO (nnunetv2_lgms export / predict).

The end-to-end tests (slow) compare against nnU-Net's predictor (and once the stock nnUNetv2_predict command) on the
same checkpoints: >= 99.9 % equal pixels/voxels and equal geometry. The checkpoints are untrained, written by the
trainers themselves with a balanced head (deploy_fixtures.py): about half of every image is foreground, so a
pipeline that differs (no mirroring, one fold fewer) agrees on only 65-85 % of the voxels and fails.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deploy_fixtures import (PYTORCH_REFERENCE, assert_same_segmentations, nnunet_predict, project_environ,
                             read_segmentation, regions_variant, tiny_3d_project, untrained_model)
from nnunetv2_lgms.cli import main
from nnunetv2_lgms.deploy import engines, verify
from nnunetv2_lgms.deploy.manifest import MANIFEST_NAME

INSTALL_HINT = 'pip install "nnunetv2_lgms[deploy]"'


def export(project, trainer: str, folds, out: Path, fmt: str, *extra: str) -> int:
    with project_environ(project):
        return main(["export", "-d", str(project.dataset_id), "-c", project.configuration, "-tr", trainer,
                     "-f", *map(str, folds), "-o", str(out), "--format", fmt, *extra])


def predict(images: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["predict", "-i", str(images), "-o", str(out), "-m", str(model), "-npp", "0", "-nps", "0",
                 "--disable_progress_bar", *extra])


def leftovers(folder: Path) -> list:
    """Staging folders of export/predict left beside their outputs."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".old")))


# ---- engines ---------------------------------------------------------------------------------------------------

def small_unet(deep_supervision: bool = True) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    return PlainConvUNet(3, 3, (8, 16, 32), nn.Conv2d, 3, (1, 2, 2), 2, 2, (2, 2), conv_bias=True,  # 2 classes
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)


def test_engines_run_the_reference_network_on_both_runtimes_with_a_free_batch_axis():
    torch.manual_seed(0)
    net = small_unet(deep_supervision=True).train()
    reference = engines.reference_network(net)
    assert net.training and net.decoder.deep_supervision  # the original is untouched
    assert not reference.training and not reference.decoder.deep_supervision
    assert set(engines.available_backends()) == {"openvino", "onnxruntime"}
    x1, x3 = torch.randn(1, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected1, expected3 = reference(x1), reference(x3)
    for backend in engines.BACKENDS:
        engine = engines.engine_for(reference, x1, backend, threads=1)
        assert engine.backend == backend
        out1, out3 = engine(x1), engine(x3)
        assert out1.dtype == torch.float32 and out3.shape == (3, 2, 32, 32)
        torch.testing.assert_close(out1, expected1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out3, expected3, atol=1e-4, rtol=1e-4)
        out1 += 1  # nnU-Net adds into the network's output in place
    with pytest.raises(ValueError, match="training mode"):
        engines.openvino_model(net, x1)
    with pytest.raises(ValueError, match="float32 only"):
        engines.engine_for(reference, x1, "onnxruntime", precision="bf16")


def test_a_missing_runtime_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert engines.available_backends() == []
    for call in (lambda: engines.compile_openvino("model.xml"), lambda: engines.compile_onnxruntime(b""),
                 lambda: engines.engine_for(small_unet().eval(), torch.randn(1, 3, 32, 32), "openvino")):
        with pytest.raises(engines.RuntimeUnavailable, match=r'pip install "nnunetv2_lgms\[deploy\]"') as info:
            call()
        assert isinstance(info.value, ImportError)


class _Different(nn.Module):
    """Computes something else when converted than when run (as a Python branch frozen by tracing would)."""

    def forward(self, x):
        return x + 1 if torch.jit.is_tracing() or torch.compiler.is_compiling() else x


@torch.library.custom_op("nnunetv2_lgms_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class _Unconvertible(nn.Module):
    def forward(self, x):
        return _mystery(x)


class _Toy(nn.Module):
    def __init__(self, odd: nn.Module):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), odd)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_a_divergence_is_traced_to_the_module_that_causes_it():
    net = _Toy(_Different()).eval()
    engine = engines.engine_for(net, torch.randn(1, 3, 16, 16), "openvino")
    comparison = verify.compare(net, engine, (3, 16, 16))
    assert not comparison.ok and comparison.max_abs_diff > 0.5
    found = verify.locate_divergence(net, (3, 16, 16), "openvino")
    assert (found.module, found.module_class, found.own_code) == ("body.2", "_Different", False)
    assert "max |difference|" in found.describe()
    # an op without converter: named with the converter's message
    found = verify.locate_divergence(_Toy(_Unconvertible()).eval(), (3, 16, 16), "openvino")
    assert found.module == "body.2" and "nnunetv2_lgms_test::mystery" in found.reason
    # agreeing networks: compare passes
    good = _Toy(nn.Identity()).eval()
    assert verify.compare(good, engines.engine_for(good, torch.randn(1, 3, 16, 16), "openvino"), (3, 16, 16)).ok


# ---- a tiny 3D model for export and the error paths (hand-written plan, no planner run) ----------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """nnU-Net's network on a tiny anisotropic 3D dataset: folds 0 and 1 (untrained, balanced) exported to OpenVINO."""
    root = tmp_path_factory.mktemp("deploy_tiny")
    project = tiny_3d_project(root)
    model = untrained_model(project, "nnUNetTrainer", ("0", "1"))
    out = root / "export_openvino"
    assert export(project, "nnUNetTrainer", [0, 1], out, "openvino") == 0
    return project, model, out


def test_export_writes_a_self_contained_model_folder(tiny):
    project, model, out = tiny
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["format"] == "openvino" and manifest["trainer_name"] == "nnUNetTrainer"
    assert [f["fold"] for f in manifest["folds"]] == ["0", "1"]
    assert manifest["patch_size"] == [8, 16, 16] and manifest["num_input_channels"] == 1
    assert manifest["inference_allowed_mirroring_axes"] == [0, 1, 2]
    assert manifest["labels"] == {"background": 0, "lesion": 1} and manifest["file_ending"] == ".nii.gz"
    for fold in manifest["folds"]:
        check = fold["checks"]["openvino"]
        assert check["max_abs_diff"] <= check["tolerance"] and check["batch_sizes"] == [1]
        assert (out / fold["model"]).is_file() and (out / fold["model"]).with_suffix(".bin").is_file()
        checkpoint = torch.load(out / fold["checkpoint"], weights_only=False)
        assert set(checkpoint) == {"network_weights", "trainer_name", "init_args", "inference_allowed_mirroring_axes"}
    for name in ("plans.json", "dataset.json"):
        assert json.loads((out / name).read_text()) == json.loads((model / name).read_text())
    assert leftovers(out.parent) == []


@pytest.mark.slow
def test_tiny_3d_ensemble_matches_nnunet_predictor_and_the_check_can_fail(tiny, tmp_path):
    project, model, out = tiny
    reference = nnunet_predict(project, model, ["0", "1"], tmp_path / "reference")
    assert predict(project.raw / "imagesTs", tmp_path / "openvino", out) == 0
    assert_same_segmentations(reference, tmp_path / "openvino", ".nii.gz")
    assert predict(project.raw / "imagesTs", tmp_path / "torch", out, "--backend", "torch") == 0
    assert_same_segmentations(reference, tmp_path / "torch", ".nii.gz")
    args = json.loads((tmp_path / "openvino" / "predict_from_raw_data_args.json").read_text())
    assert args["output_folder_or_list_of_truncated_output_files"] == str(tmp_path / "openvino")
    assert args["nnunetv2_lgms_deploy"]["backend"] == "openvino"
    # the same comparison rejects a pipeline that is not nnU-Net's: one fold only, or no mirroring
    for extra in (["-f", "0"], ["--disable_tta"]):
        assert predict(project.raw / "imagesTs", tmp_path / "other", out, *extra) == 0
        with pytest.raises(AssertionError):
            assert_same_segmentations(reference, tmp_path / "other", ".nii.gz")
    assert leftovers(tmp_path) == []


def test_export_refuses_missing_folds_and_checkpoints(tiny, tmp_path, capsys):
    project, _, _ = tiny
    assert export(project, "nnUNetTrainer", [0, 3], tmp_path / "out", "openvino") == 1
    err = capsys.readouterr().err
    assert "fold(s) 3" in err and "checkpoint_final.pth" in err and "-f 0 1" in err
    assert export(project, "nnUNetTrainer", [0], tmp_path / "out", "openvino", "-chk", "checkpoint_best.pth") == 1
    assert "checkpoint_best.pth" in capsys.readouterr().err
    assert export(project, "nnUNetTrainerLGMSNet", [0], tmp_path / "out", "openvino") == 1
    assert "no trained model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_export_replaces_a_non_empty_folder_only_with_overwrite(tiny, tmp_path, capsys):
    project, _, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    assert export(project, "nnUNetTrainer", [0], out, "openvino") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "user data"
    assert export(project, "nnUNetTrainer", [0], out, "openvino", "--overwrite") == 0
    assert {p.name for p in out.iterdir()} == {MANIFEST_NAME, "dataset.json", "fold_0", "plans.json"}
    assert leftovers(tmp_path) == []


def test_export_names_the_module_that_differs_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    project, _, _ = tiny
    real = engines.reference_network

    def with_a_different_head(net):  # a module that computes something else once converted
        ref = real(net)
        ref.decoder.seg_layers[-1] = nn.Sequential(ref.decoder.seg_layers[-1], _Different())
        return ref

    monkeypatch.setattr(engines, "reference_network", with_a_different_head)
    assert export(project, "nnUNetTrainer", [0], tmp_path / "out", "openvino") == 1
    err = capsys.readouterr().err
    assert "differs from PyTorch" in err
    assert re.search(r"Offending module: module `decoder\.seg_layers\.\d+\.1` \(_Different\)", err), err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unsupported_format_or_backend(tiny, tmp_path, capsys):
    project, _, out = tiny
    with pytest.raises(SystemExit) as info:
        export(project, "nnUNetTrainer", [0], tmp_path / "out", "tensorrt")
    assert info.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        predict(project.raw / "imagesTs", tmp_path / "pred", out, "--backend", "tensorrt")
    assert info.value.code == 2
    capsys.readouterr()
    assert predict(project.raw / "imagesTs", tmp_path / "pred", out, "--backend", "onnxruntime") == 1
    assert "--format onnx" in capsys.readouterr().err
    assert not (tmp_path / "pred").exists() and not (tmp_path / "out").exists()


def test_missing_runtime_is_an_error_naming_the_fix(tiny, tmp_path, monkeypatch, capsys):
    project, _, out = tiny
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert predict(project.raw / "imagesTs", tmp_path / "pred", out) == 1
    assert INSTALL_HINT in capsys.readouterr().err
    assert export(project, "nnUNetTrainer", [0], tmp_path / "out", "openvino") == 1
    assert INSTALL_HINT in capsys.readouterr().err
    assert not (tmp_path / "pred").exists() and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_predict_refuses_missing_folds_files_and_non_exports(tiny, tmp_path, capsys):
    project, model, out = tiny
    images = project.raw / "imagesTs"
    assert predict(images, tmp_path / "pred", out, "-f", "2") == 1
    assert "fold(s) 2 not in the export" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "fold_1" / "model.bin").unlink()
    assert predict(images, tmp_path / "pred", broken) == 1
    assert "fold_1/model.bin is missing" in capsys.readouterr().err
    assert predict(images, tmp_path / "pred2", model) == 1  # a results folder, not an export
    assert "not an export folder" in capsys.readouterr().err
    assert not (tmp_path / "pred2").exists()


def test_predict_refuses_images_of_another_dataset(tiny, tmp_path, capsys):
    project, _, out = tiny
    image = sorted((project.raw / "imagesTs").iterdir())[0]
    two_channels = tmp_path / "two_channels"
    two_channels.mkdir()
    shutil.copy(image, two_channels / "case_0000.nii.gz")
    shutil.copy(image, two_channels / "case_0001.nii.gz")
    assert predict(two_channels, tmp_path / "pred", out) == 1
    err = capsys.readouterr().err
    assert "has 2 channel(s)" in err and "expects 1" in err
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    (pngs / "case_0000.png").write_bytes(b"")
    assert predict(pngs, tmp_path / "pred", out) == 1
    assert "no .nii.gz images" in capsys.readouterr().err
    badly_named = tmp_path / "badly_named"
    badly_named.mkdir()
    shutil.copy(image, badly_named / "scan.nii.gz")
    assert predict(badly_named, tmp_path / "pred", out) == 1
    assert "CASE_XXXX" in capsys.readouterr().err
    assert not (tmp_path / "pred").exists()


def test_a_failure_during_prediction_leaves_the_output_folder_as_it_was(tiny, tmp_path, monkeypatch):
    project, _, out = tiny
    calls, per_case = [], 2 * 8  # 2 folds x 8 mirrorings of the one tile of a tiny case

    def fail_on_the_second_case(self, x):
        calls.append(1)
        if len(calls) > per_case:
            raise RuntimeError("simulated crash")
        return real_run(self, x)

    real_run = engines.OpenVINOEngine._run
    monkeypatch.setattr(engines.OpenVINOEngine, "_run", fail_on_the_second_case)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    for target in (tmp_path / "fresh", existing):
        calls.clear()
        with pytest.raises(RuntimeError, match="simulated crash"):
            predict(project.raw / "imagesTs", target, out)
        assert len(calls) > per_case  # the first case was written (to the staging folder)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


# ---- end to end on planned synthetic datasets (the session fixtures of conftest.py) ---------------------------------

def _stock_nnunetv2_predict(project, trainer: str, folds, out: Path) -> Path:
    from nnunetv2_lgms.nnunet_runner import run_nnunet
    run_nnunet(["nnUNetv2_predict", "-i", project.raw / "imagesTs", "-o", out, "-d", project.dataset_id,
                "-c", project.configuration, "-f", *folds, "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1",
                "--disable_progress_bar"], {**project.env, **PYTORCH_REFERENCE}, out.parent / "stock_predict.log")
    return out


@pytest.mark.slow
def test_2d_lgmsnet_openvino_equals_stock_nnunetv2_predict(e2e_project_2d, tmp_path):
    project, trainer = e2e_project_2d, "nnUNetTrainerLGMSNet"
    untrained_model(project, trainer)
    assert export(project, trainer, [0], tmp_path / "export", "openvino") == 0
    stock = _stock_nnunetv2_predict(project, trainer, ["0"], tmp_path / "stock")
    # worker processes for preprocessing and export, as nnUNetv2_predict runs them
    assert main(["predict", "-i", str(project.raw / "imagesTs"), "-o", str(tmp_path / "ours"), "-m",
                 str(tmp_path / "export"), "-npp", "1", "-nps", "1", "--threads", "2", "--disable_progress_bar"]) == 0
    assert_same_segmentations(stock, tmp_path / "ours", ".png")
    assert predict(project.raw / "imagesTs", tmp_path / "torch", tmp_path / "export", "--backend", "torch") == 0
    assert_same_segmentations(stock, tmp_path / "torch", ".png")


@pytest.mark.slow
def test_3d_anisotropic_lgmsnet_onnx_on_onnxruntime(e2e_project_3d, tmp_path):
    project, trainer = e2e_project_3d, "nnUNetTrainerLGMSNet"
    model = untrained_model(project, trainer)
    plans = json.loads((model / "plans.json").read_text())
    spacing = plans["configurations"]["3d_fullres"]["spacing"]
    assert max(spacing) / min(spacing) > 2  # anisotropic
    assert export(project, trainer, [0], tmp_path / "export", "onnx") == 0
    assert (tmp_path / "export" / "fold_0" / "model.onnx").is_file()
    reference = nnunet_predict(project, model, ["0"], tmp_path / "reference")
    assert predict(project.raw / "imagesTs", tmp_path / "ours", tmp_path / "export") == 0  # default: onnxruntime
    assert_same_segmentations(reference, tmp_path / "ours", ".nii.gz")
    # the export was checked against torch on both runtimes that read ONNX
    checks = json.loads((tmp_path / "export" / MANIFEST_NAME).read_text())["folds"][0]["checks"]
    assert set(checks) == {"onnxruntime", "openvino"}


@pytest.mark.slow
def test_region_based_dataset_sigmoid_outputs_and_region_order(e2e_project_2d, tmp_path):
    project, trainer = regions_variant(e2e_project_2d), "nnUNetTrainerLGMSNet"
    model = untrained_model(project, trainer)
    assert export(project, trainer, [0], tmp_path / "export", "openvino") == 0
    manifest = json.loads((tmp_path / "export" / MANIFEST_NAME).read_text())
    assert manifest["regions_class_order"] == [1, 2] and manifest["num_output_channels"] == 2
    reference = nnunet_predict(project, model, ["0"], tmp_path / "reference")
    assert predict(project.raw / "imagesTs", tmp_path / "ours", tmp_path / "export") == 0
    assert_same_segmentations(reference, tmp_path / "ours", ".png")
    labels = set()
    for path in (tmp_path / "ours").glob("*.png"):
        labels |= set(np.unique(read_segmentation(path)[0]).tolist())
    assert labels == {0, 1, 2}  # background, the whole lesion only, the core


@pytest.mark.slow
def test_nnunet_network_onnx_on_onnxruntime(e2e_project_2d, tmp_path):
    project, trainer = e2e_project_2d, "nnUNetTrainer"
    model = untrained_model(project, trainer)
    assert export(project, trainer, [0], tmp_path / "export", "onnx") == 0
    reference = nnunet_predict(project, model, ["0"], tmp_path / "reference")
    assert predict(project.raw / "imagesTs", tmp_path / "ours", tmp_path / "export") == 0
    assert_same_segmentations(reference, tmp_path / "ours", ".png")


@pytest.mark.slow
def test_glims_2d_openvino(e2e_project_2d, tmp_path):
    project, trainer = e2e_project_2d, "nnUNetTrainerGLIMS"
    model = untrained_model(project, trainer)
    assert export(project, trainer, [0], tmp_path / "export", "openvino") == 0
    reference = nnunet_predict(project, model, ["0"], tmp_path / "reference")
    assert predict(project.raw / "imagesTs", tmp_path / "ours", tmp_path / "export") == 0
    assert_same_segmentations(reference, tmp_path / "ours", ".png")
