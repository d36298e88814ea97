"""nnU-Net plans for typical datasets without their images: a dataset fingerprint is written by hand and nnU-Net's own
``nnUNetv2_plan_experiment`` turns it into plans, so the patch size, batch size, strides and stage count are exactly
what nnU-Net would plan for such data. Used by the speed report to profile networks on realistic plans."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Sequence, Tuple

from nnunetv2_lgms.benchmark.models import BenchmarkError, PlanContext, load_plan_context


@dataclass(frozen=True)
class PlanPreset:
    description: str
    dataset_id: int
    configuration: str
    channel_names: Dict[str, str]
    labels: Dict[str, int]
    spacing: Tuple[float, ...]  # nnU-Net axis order (z, y, x); 2D data has z spacing 999
    shape: Tuple[int, ...]  # shape after cropping, (z, y, x); 2D data has z = 1
    num_cases: int
    file_ending: str = ".nii.gz"


PRESETS: Dict[str, PlanPreset] = {
    "2d-256": PlanPreset(
        "2D 256x256 RGB images, 240 cases (the LGMSNet paper's resize; nnU-Net plans batch 12)",
        971, "2d", {"0": "R", "1": "G", "2": "B"}, {"background": 0, "lesion": 1},
        (999.0, 1.0, 1.0), (1, 256, 256), 240, ".png"),
    "hippocampus-3d": PlanPreset(
        "3D MRI like MSD Task04 Hippocampus: 1 mm isotropic, ~36x50x35 voxels, 260 cases",
        972, "3d_fullres", {"0": "MRI"}, {"background": 0, "anterior": 1, "posterior": 2},
        (1.0, 1.0, 1.0), (36, 50, 35), 260),
    "abdomen-ct-3d": PlanPreset(
        "3D abdomen CT like BTCV at 2 x 1.5 x 1.5 mm (z, y, x), 200x256x256 voxels, 30 cases, 14 labels",
        973, "3d_fullres", {"0": "CT"}, {"background": 0, **{f"organ{i}": i for i in range(1, 14)}},
        (2.0, 1.5, 1.5), (200, 256, 256), 30),
}


def write_fingerprint(preset: PlanPreset, raw: Path, preprocessed: Path) -> str:
    name = f"Dataset{preset.dataset_id:03d}_Speed{preset.configuration.replace('_', '')}"
    (raw / name).mkdir(parents=True, exist_ok=True)
    (preprocessed / name).mkdir(parents=True, exist_ok=True)
    # "dataset" lists the (absent) files so that the planner does not scan imagesTr; the reader is named so that it
    # needs no example file
    reader = "NaturalImage2DIO" if preset.file_ending == ".png" else "SimpleITKIO"
    n_ch = len(preset.channel_names)
    cases = {f"case_{i:04d}": {"images": [f"imagesTr/case_{i:04d}_{c:04d}{preset.file_ending}" for c in range(n_ch)],
                               "label": f"labelsTr/case_{i:04d}{preset.file_ending}"} for i in range(preset.num_cases)}
    dataset_json = {"channel_names": preset.channel_names, "labels": preset.labels, "numTraining": preset.num_cases,
                    "file_ending": preset.file_ending, "description": preset.description,
                    "overwrite_image_reader_writer": reader, "dataset": cases}
    (raw / name / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    intensity = {"max": 1000.0, "mean": 100.0, "median": 100.0, "min": -1000.0, "percentile_00_5": -900.0,
                 "percentile_99_5": 900.0, "std": 200.0}
    fingerprint = {"foreground_intensity_properties_per_channel": {c: intensity for c in preset.channel_names},
                   "median_relative_size_after_cropping": 1.0,
                   "shapes_after_crop": [list(preset.shape)] * preset.num_cases,
                   "spacings": [list(preset.spacing)] * preset.num_cases}
    (preprocessed / name / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=2))
    return name


def plan_preset(key: str, root: Path) -> PlanContext:
    """Write the preset's fingerprint under ``root`` (its own nnUNet_raw/preprocessed), run nnU-Net's planner and
    load the configuration. Sets ``nnUNet_raw``/``nnUNet_preprocessed`` of this process to ``root``'s folders."""
    if key not in PRESETS:
        raise BenchmarkError(f"unknown plan preset {key!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[key]
    raw, preprocessed, results = (Path(root) / d for d in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    name = write_fingerprint(preset, raw, preprocessed)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(preprocessed), nnUNet_results=str(results))
    cmd = [sys.executable, "-c", "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
           "plan_experiment_entry; plan_experiment_entry()", "-d", str(preset.dataset_id)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchmarkError(f"nnU-Net's planner failed on preset {key}:\n{done.stderr[-2000:]}")
    os.environ.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(preprocessed), nnUNet_results=str(results))
    return load_plan_context(name, preset.configuration)


def describe(ctx: PlanContext) -> str:
    return (f"patch {'x'.join(map(str, ctx.patch_size))}, batch {ctx.batch_size}, "
            f"{len(ctx.configuration_manager.pool_op_kernel_sizes)} stages")


def preset_keys() -> Sequence[str]:
    return list(PRESETS)
