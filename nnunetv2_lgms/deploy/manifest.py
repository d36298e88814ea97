"""The export folder: its layout, its manifest, and the checks a reader runs before trusting it.

``nnunetv2_lgms export`` writes, and ``nnunetv2_lgms predict`` reads::

    DIR/deploy_manifest.json          what was exported, from where, and what the predictor needs (below)
    DIR/plans.json, dataset.json      copied from the results folder, as nnU-Net keeps them beside the folds
    DIR/dataset_fingerprint.json      (when the results folder has it)
    DIR/fold_F/model.onnx             --format onnx: one self-contained ONNX file per fold
    DIR/fold_F/model.xml, model.bin   --format openvino: OpenVINO IR per fold, float32 weights
    DIR/fold_F/<checkpoint name>      the fold's weights (network_weights, trainer_name, init_args, mirroring axes;
                                      no optimiser state), for --backend torch

So the folder is self-contained (it can be copied to a machine without ``nnUNet_results``) and is also a valid
nnU-Net model folder: ``nnUNetv2_predict_from_modelfolder -m DIR`` runs its checkpoints in PyTorch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from nnunetv2_lgms.benchmark.models import BenchmarkError

MANIFEST_NAME = "deploy_manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("onnx", "openvino")
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
# which runtimes can run each format (OpenVINO reads ONNX files too); the first is the default
FORMAT_BACKENDS = {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",)}
TORCH_BACKEND = "torch"
BACKEND_CHOICES = ("onnxruntime", "openvino", TORCH_BACKEND)
# largest accepted |runtime - torch| logit difference at export, relative to the largest |logit| (at least 1):
# float32 rounding stays far below (OpenVINO's InstanceNorm alone costs ~1e-5 per layer), a wrong op far above
DEFAULT_TOLERANCE = 1e-2


class DeployError(BenchmarkError):
    """A user-facing error of export/predict: printed as ``error: ...``, exit code 1."""


def fold_dir_name(fold: str) -> str:
    return f"fold_{fold}"


@dataclass
class ExportManifest:
    folder: Path
    format: str
    dataset_name: str
    configuration: str
    plans_identifier: str
    trainer_name: str
    checkpoint_name: str
    folds: List[str]
    num_input_channels: int
    num_output_channels: int
    patch_size: List[int]
    inference_allowed_mirroring_axes: Optional[List[int]]
    data: dict = field(default_factory=dict)  # the whole manifest as written

    # ---- reading ----

    @classmethod
    def read(cls, folder) -> "ExportManifest":
        """Read and check ``folder``'s manifest; every problem is a :class:`DeployError` naming the fix."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise DeployError(f"model folder {folder} does not exist; create it with nnunetv2_lgms export ... -o "
                              f"{folder}")
        if not path.is_file():
            raise DeployError(f"{folder} is not an export folder (no {MANIFEST_NAME}); create one with "
                              f"nnunetv2_lgms export -d ID -c CONFIG -tr TRAINER -f FOLDS -o {folder}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DeployError(f"{path} is not valid JSON ({e}); export the model again") from None
        if data.get("manifest_version") != MANIFEST_VERSION:
            raise DeployError(f"{path} has manifest version {data.get('manifest_version')!r}, this nnunetv2_lgms reads "
                              f"version {MANIFEST_VERSION}; export the model again with this version")
        if data.get("format") not in FORMATS:
            raise DeployError(f"{path}: unknown format {data.get('format')!r} (known: {', '.join(FORMATS)})")
        try:
            manifest = cls(folder=folder, format=data["format"], dataset_name=data["dataset_name"],
                           configuration=data["configuration"], plans_identifier=data["plans_identifier"],
                           trainer_name=data["trainer_name"], checkpoint_name=data["checkpoint_name"],
                           folds=[str(f["fold"]) for f in data["folds"]],
                           num_input_channels=int(data["num_input_channels"]),
                           num_output_channels=int(data["num_output_channels"]),
                           patch_size=[int(s) for s in data["patch_size"]],
                           inference_allowed_mirroring_axes=data.get("inference_allowed_mirroring_axes"), data=data)
        except (KeyError, TypeError, ValueError) as e:
            raise DeployError(f"{path} is incomplete or damaged ({type(e).__name__}: {e}); export the model again") \
                from None
        for name in ("plans.json", "dataset.json"):
            if not (folder / name).is_file():
                raise DeployError(f"{folder / name} is missing; the export is incomplete, export the model again")
        return manifest

    def describe(self) -> str:
        return f"{self.dataset_name}, {self.configuration}, {self.trainer_name}, folds {', '.join(self.folds)}"

    def model_file(self, fold: str) -> Path:
        return self.folder / fold_dir_name(fold) / MODEL_FILES[self.format]

    def checkpoint_file(self, fold: str) -> Path:
        return self.folder / fold_dir_name(fold) / self.checkpoint_name

    def select_folds(self, folds: Optional[List[str]]) -> List[str]:
        """``folds`` (default: all exported) after checking that each was exported."""
        if not folds:
            return list(self.folds)
        folds = [str(f) for f in folds]
        missing = [f for f in folds if f not in self.folds]
        if missing:
            raise DeployError(f"fold(s) {', '.join(missing)} not in the export {self.folder} (it has folds "
                              f"{', '.join(self.folds)}); export them with nnunetv2_lgms export ... -f "
                              f"{' '.join(missing)}, or pick from the exported folds with -f")
        return folds

    def default_backend(self) -> str:
        return FORMAT_BACKENDS[self.format][0]

    def check_backend(self, backend: str) -> None:
        allowed = FORMAT_BACKENDS[self.format] + (TORCH_BACKEND,)
        if backend not in allowed:
            raise DeployError(f"backend {backend!r} cannot run this export ({self.format} format in {self.folder}); "
                              f"use --backend {' or '.join(allowed)}, or export with --format onnx, which ONNX Runtime "
                              f"and OpenVINO both run")

    def check_files(self, folds: List[str], backend: str) -> None:
        """The files ``backend`` needs for ``folds`` exist."""
        for fold in folds:
            needed = [self.checkpoint_file(fold)] if backend == TORCH_BACKEND else [self.model_file(fold)]
            if self.format == "openvino" and backend != TORCH_BACKEND:
                needed.append(self.model_file(fold).with_suffix(".bin"))
            for path in needed:
                if not path.is_file():
                    raise DeployError(f"{path} is missing: the export in {self.folder} is incomplete; export fold "
                                      f"{fold} again (nnunetv2_lgms export ... -f {fold} --overwrite)")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def manifest_dict(**fields) -> Dict:
    """The manifest as written: ``fields`` plus the version stamp."""
    return {"manifest_version": MANIFEST_VERSION, **fields}
