"""Helpers of tests/test_deploy.py: models without training, nnU-Net's own prediction as the reference, and the
comparison of two prediction folders.

Models are *untrained* fold checkpoints written by the trainer itself (``write_untrained_fold``): what is tested is
that export + runtime reproduce PyTorch inside nnU-Net's pipeline, which does not depend on what the weights learnt.
An untrained network tends to predict one class everywhere, which would make any two predictions agree; so
:func:`balance_head` shifts the segmentation head's bias until, on a real case, half the pixels of each class
(region) are on either side of the decision boundary. The segmentations are then non-trivial and sensitive to any
difference in the logits.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, Sequence

import numpy as np
import torch

from e2e_utils import NnunetProject
from nnunetv2_lgms.nnunet_runner import nnunet_env

NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")
# the networks of this package run nnU-Net's CPU eval forward on a runtime themselves unless told otherwise
# (nnunetv2_lgms.acceleration.runtime); the references of these tests are PyTorch's computation
PYTORCH_REFERENCE = {"nnUNet_lgms_cpu_runtime": "torch"}


@contextlib.contextmanager
def environ(values: Dict[str, str]) -> Iterator[None]:
    """Set environment variables in this process for the block (nnU-Net 2.8 reads its paths lazily)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def project_environ(project) -> contextlib.AbstractContextManager:
    return environ({k: project.env[k] for k in NNUNET_VARS if k in project.env})


def results_folder(project, trainer: str) -> Path:
    return (Path(project.env["nnUNet_results"]) / project.raw.name
            / f"{trainer}__nnUNetPlans__{project.configuration}")


# ---- models without training --------------------------------------------------------------------------------------

def _centre_patch(data: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """(C, *spatial) zero-padded to at least ``patch`` and centre-cropped to it."""
    pad = [(0, 0)] + [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for s, p in zip(data.shape[1:], patch)]
    data = np.pad(data, pad)
    starts = [(s - p) // 2 for s, p in zip(data.shape[1:], patch)]
    return data[(slice(None), *[slice(a, a + p) for a, p in zip(starts, patch)])]


def balance_head(model_folder: Path, fold: str, case_files: Sequence[str]) -> None:
    """Shift the bias of the fold's segmentation head (the last layer with one bias per output) so that the median
    logit margin of each class against background (each region's logit, for regions) is 0 on ``case_files``,
    preprocessed as nnU-Net preprocesses them."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_lgms.benchmark.models import find_trainer_class
    from nnunetv2_lgms.deploy.engines import reference_network

    path = model_folder / f"fold_{fold}" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    plans = PlansManager(json.loads((model_folder / "plans.json").read_text()))
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    config = plans.get_configuration(checkpoint["init_args"]["configuration"])
    labels = plans.get_label_manager(dataset_json)
    num_outputs = labels.num_segmentation_heads
    net = find_trainer_class(checkpoint["trainer_name"]).build_network_architecture(
        plans, config, determine_num_input_channels(plans, config, dataset_json), num_outputs, False)
    net.load_state_dict(checkpoint["network_weights"])
    net = reference_network(net)

    data, _, _ = config.preprocessor_class(verbose=False).run_case(list(case_files), None, plans, config, dataset_json)
    if len(config.patch_size) == 2:  # 2D configurations see (C, 1, H, W) data one slice at a time
        data = data[:, data.shape[1] // 2]
    x = torch.from_numpy(np.ascontiguousarray(_centre_patch(data, config.patch_size)))[None].float()

    heads = []
    hooks = [m.register_forward_hook(lambda *_, n=n: heads.append(n)) for n, m in net.named_modules()
             if not list(m.children()) and getattr(m, "bias", None) is not None and m.bias.shape == (num_outputs,)]

    def margins() -> torch.Tensor:
        with torch.no_grad():
            logits = net(x)[0].flatten(1)
        if labels.has_regions:
            return logits.median(dim=1).values
        return torch.cat([torch.zeros(1), (logits[1:] - logits[:1]).median(dim=1).values])

    shift = margins()
    for h in hooks:
        h.remove()
    assert heads, "no segmentation head found"
    key = f"{heads[-1]}.bias"
    checkpoint["network_weights"][key] = checkpoint["network_weights"][key] - shift
    net.load_state_dict(checkpoint["network_weights"])
    assert margins().abs().max() < 1e-3, "the head's bias does not shift the output (not the last layer?)"
    torch.save(checkpoint, path)


def untrained_model(project, trainer: str, folds: Sequence[str] = ("0",)) -> Path:
    """The results folder of ``trainer`` on ``project`` with balanced untrained checkpoints for ``folds`` (seed =
    fold index); written once per project, trainer and fold."""
    from nnunetv2_lgms.deploy.checkpoints import write_untrained_fold

    folder = results_folder(project, trainer)
    case = project.test_cases()[0]
    case_files = sorted(str(p) for p in (project.raw / "imagesTs").glob(f"{case}_*{project.ending()}"))
    with project_environ(project):
        for fold in folds:
            if not (folder / f"fold_{fold}" / "checkpoint_final.pth").is_file():
                write_untrained_fold(project.dataset_id, project.configuration, trainer, fold, seed=int(fold))
                balance_head(folder, fold, case_files)
    return folder


# ---- reference predictions and comparisons --------------------------------------------------------------------

def nnunet_predict(project, model_folder: Path, folds: Sequence[str], out: Path) -> Path:
    """nnU-Net's predictor on the model folder exactly as ``nnUNetv2_predict -device cpu`` sets it up (default step,
    Gaussian, mirroring), sequential variant (no worker processes), PyTorch computation."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with project_environ(project), environ(PYTORCH_REFERENCE):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                    perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_folder), [f if f == "all" else int(f) for f in folds],
                                                       "checkpoint_final.pth")
        out.mkdir(parents=True, exist_ok=True)
        predictor.predict_from_files_sequential(str(project.raw / "imagesTs"), str(out))
    return out


def read_segmentation(path: Path):
    import SimpleITK as sitk
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), (image.GetSize(), image.GetSpacing(), image.GetOrigin(),
                                           image.GetDirection())


def assert_same_segmentations(reference: Path, candidate: Path, ending: str, min_agreement: float = 0.999) -> dict:
    """Every case of ``reference`` is in ``candidate`` with the same geometry (size, spacing, origin, direction) and at
    least ``min_agreement`` of its pixels/voxels equal; the reference must segment more than one label, else the
    agreement would prove nothing. Returns the agreement per case."""
    cases = sorted(p.name for p in reference.glob(f"*{ending}"))
    assert cases, f"no predictions in {reference}"
    assert sorted(p.name for p in candidate.glob(f"*{ending}")) == cases
    agreement, labels = {}, set()
    for name in cases:
        expected, expected_geometry = read_segmentation(reference / name)
        got, got_geometry = read_segmentation(candidate / name)
        assert got_geometry == expected_geometry, (name, got_geometry, expected_geometry)
        assert got.shape == expected.shape, name
        agreement[name] = float((got == expected).mean())
        labels |= set(np.unique(expected).tolist())
    assert len(labels) > 1, f"the reference predicts only {labels}: the comparison would be vacuous"
    assert min(agreement.values()) >= min_agreement, agreement
    return agreement


# ---- datasets without planning ---------------------------------------------------------------------------------

def _project_view(root: Path, dataset_id: int, raw: Path, configuration: str, dim: int, env: dict) -> NnunetProject:
    """An NnunetProject for a dataset whose plans were not made by running the planner (no __init__ planning)."""
    project = NnunetProject.__new__(NnunetProject)
    project.root, project.dataset_id, project.configuration, project.dim = root, dataset_id, configuration, dim
    project.env, project.raw = env, raw
    return project


def regions_variant(project, dataset_id: int = 993) -> NnunetProject:
    """``project``'s 2D dataset declared as a region-based one (whole lesion = labels 1 and 2, core = 2, sigmoid
    outputs, ``regions_class_order``) under a new ID in the same nnU-Net root, reusing its plans: a plan does not
    depend on the labels beyond what dataset.json says, and prediction never reads the labels."""
    name = f"Dataset{dataset_id:03d}_SyntheticRegions"
    raw = Path(project.env["nnUNet_raw"]) / name
    preprocessed = Path(project.env["nnUNet_preprocessed"]) / name
    if not raw.is_dir():
        shutil.copytree(project.raw, raw)
        dataset_json = json.loads((raw / "dataset.json").read_text())
        dataset_json["labels"] = {"background": 0, "lesion": [1, 2], "core": 2}
        dataset_json["regions_class_order"] = [1, 2]
        (raw / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        source = Path(project.env["nnUNet_preprocessed"]) / project.raw.name
        preprocessed.mkdir()
        plans = json.loads((source / "nnUNetPlans.json").read_text())
        plans["dataset_name"] = name
        (preprocessed / "nnUNetPlans.json").write_text(json.dumps(plans, indent=2))
        (preprocessed / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        shutil.copyfile(source / "dataset_fingerprint.json", preprocessed / "dataset_fingerprint.json")
    return _project_view(project.root, dataset_id, raw, project.configuration, project.dim, project.env)


def tiny_3d_project(root: Path, dataset_id: int = 995) -> NnunetProject:
    """A small anisotropic 3D dataset (2 training + 2 test volumes of 8x16x16, one channel) with a hand-written
    ``3d_fullres`` plan of nnU-Net's network (3 stages, patch 8x16x16): seconds instead of a planner run."""
    from plans_utils import configuration_dict

    from nnunetv2_lgms.synthetic import make_dataset

    env = nnunet_env(root, "cpu")
    env["nnUNet_def_n_proc"] = "1"
    raw = make_dataset(env["nnUNet_raw"], dataset_id, name="Tiny3D", dim=3, num_train=2, num_test=2,
                       size=(8, 16, 16), spacing=(2.0, 0.8, 0.8))
    config = configuration_dict((8, 16, 16), [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3]])
    config["spacing"] = [2.0, 0.8, 0.8]
    config["data_identifier"] = "nnUNetPlans_3d_fullres"
    arch = config["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [8, 16, 32]
    plans = {"dataset_name": raw.name, "plans_name": "nnUNetPlans",
             "original_median_spacing_after_transp": [2.0, 0.8, 0.8],
             "original_median_shape_after_transp": [8, 16, 16], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {"3d_fullres": config}, "experiment_planner_used": "ExperimentPlanner",
             "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {"0": {"max": 800.0, "mean": 0.0, "median": 0.0,
                                                                   "min": -200.0, "percentile_00_5": -200.0,
                                                                   "percentile_99_5": 800.0, "std": 300.0}}}
    preprocessed = Path(env["nnUNet_preprocessed"]) / raw.name
    preprocessed.mkdir(parents=True)
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps(plans, indent=2))
    shutil.copyfile(raw / "dataset.json", preprocessed / "dataset.json")
    return _project_view(root, dataset_id, raw, "3d_fullres", 3, copy.deepcopy(env))
