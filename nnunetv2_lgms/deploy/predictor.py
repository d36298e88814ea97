"""nnU-Net's own predictor with the network call on a CPU runtime.

Preprocessing, the Gaussian sliding window, mirroring, fold ensembling, resampling and export are
``nnunetv2.inference.predict_from_raw_data.nnUNetPredictor``'s code, unchanged: the predictor is set up with
``manual_initialization`` and its network is an :class:`EngineSwitch`, a module that holds one runtime engine per
fold. nnU-Net ensembles folds by loading each fold's weights into its network (``load_state_dict``) and summing the
sliding-window logits; here each fold's "weights" are a token naming its engine, so the same loop runs the folds'
engines in turn and sums their outputs the same way.

``--backend torch`` needs no switch: the export folder is a valid nnU-Net model folder, so nnU-Net's
``initialize_from_trained_model_folder`` loads its checkpoints as ``nnUNetv2_predict_from_modelfolder`` would.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from nnunetv2_lgms.deploy import engines
from nnunetv2_lgms.deploy.manifest import BACKEND_CHOICES, TORCH_BACKEND, DeployError, ExportManifest, read_json
from nnunetv2_lgms.deploy.staging import staged

FOLD_KEY = "nnunetv2_lgms_deploy_fold"
# This package's networks hand nnU-Net's CPU eval forward to a runtime themselves unless this variable says "torch"
# (nnunetv2_lgms.acceleration.runtime); --backend torch sets it so that the PyTorch computation is what runs.
CPU_RUNTIME_ENV = "nnUNet_lgms_cpu_runtime"


@contextlib.contextmanager
def pytorch_only(active: bool = True):
    """While active, this package's networks compute nnU-Net's CPU eval forward in PyTorch (see CPU_RUNTIME_ENV)."""
    if not active:
        yield
        return
    previous = os.environ.get(CPU_RUNTIME_ENV)
    os.environ[CPU_RUNTIME_ENV] = TORCH_BACKEND
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(CPU_RUNTIME_ENV, None)
        else:
            os.environ[CPU_RUNTIME_ENV] = previous


class EngineSwitch(nn.Module):
    """Stands in for the network inside ``nnUNetPredictor``: calls the engine of the fold whose token was loaded
    last with ``load_state_dict`` (the predictor loads each fold's "parameters" before its sliding window)."""

    def __init__(self, engines_by_fold: Dict[str, engines.Engine]):
        super().__init__()
        self.engines = dict(engines_by_fold)
        self.active = next(iter(self.engines))

    @staticmethod
    def token(fold: str) -> dict:
        """The per-fold entry of the predictor's ``list_of_parameters``."""
        return {FOLD_KEY: str(fold)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if FOLD_KEY not in state_dict:
            raise ValueError("EngineSwitch loads fold tokens (EngineSwitch.token), not network weights")
        self.active = state_dict[FOLD_KEY]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engines[self.active](x)


def build_engines(manifest: ExportManifest, folds: Sequence[str], backend: str,
                  threads: Optional[int] = None) -> Dict[str, engines.Engine]:
    compile_fn = engines.compile_onnxruntime if backend == "onnxruntime" else engines.compile_openvino
    return {fold: compile_fn(manifest.model_file(fold), threads) for fold in folds}


# ---- input checks ------------------------------------------------------------------------------------------------

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def check_inputs(input_dir: Path, manifest: ExportManifest, plans_manager, dataset_json: dict) -> int:
    """That ``input_dir`` holds cases this model can read: files with the dataset's ending, named
    ``CASE_XXXX``, the same channel files for every case, and (reading the first case with the dataset's reader) as
    many channels as ``dataset.json`` declares. Returns the number of cases."""
    ending = dataset_json["file_ending"]
    model = f"the model in {manifest.folder} ({manifest.dataset_name}, {manifest.configuration})"
    if not input_dir.is_dir():
        raise DeployError(f"input folder {input_dir} does not exist")
    files = sorted(p.name for p in input_dir.iterdir() if p.is_file() and p.name.endswith(ending))
    if not files:
        others = sorted({"".join(p.suffixes) for p in input_dir.iterdir() if p.is_file()})
        found = f" (it has {', '.join(others)} files)" if others else " (it is empty)"
        raise DeployError(f"no {ending} images in {input_dir}{found}; {model} reads CASE_0000{ending} files, as "
                          f"its dataset.json says. Is -m the export of the right dataset and configuration?")
    channels_per_case: Dict[str, List[int]] = defaultdict(list)
    for name in files:
        match = _CHANNEL_FILE.match(name[: -len(ending)])
        if match is None:
            raise DeployError(f"{input_dir / name} is not named CASE_XXXX{ending} (nnU-Net's naming: a case "
                              f"identifier, then _0000 for the first channel, _0001 for the second, ...)")
        channels_per_case[match["case"]].append(int(match["channel"]))
    channel_names = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    for case, channels in sorted(channels_per_case.items()):
        if sorted(channels) != list(range(len(channels))):
            raise DeployError(f"case {case} in {input_dir} has channel files "
                              f"{', '.join(f'_{c:04d}' for c in sorted(channels))}; they must be numbered from "
                              f"_0000 without gaps")
    counts = {case: len(c) for case, c in channels_per_case.items()}
    if len(set(counts.values())) > 1:
        by_count = defaultdict(list)
        for case, n in counts.items():
            by_count[n].append(case)
        detail = "; ".join(f"{n} file(s): {', '.join(sorted(cases)[:3])}" for n, cases in sorted(by_count.items()))
        raise DeployError(f"the cases in {input_dir} have different numbers of channel files ({detail}); {model} "
                          f"needs the same channels for every case ({len(channel_names)}: "
                          f"{', '.join(map(str, channel_names.values()))})")
    first = sorted(channels_per_case)[0]
    first_files = [str(input_dir / f"{first}_{c:04d}{ending}") for c in range(counts[first])]
    reader = plans_manager.image_reader_writer_class()
    try:
        data, _ = reader.read_images(first_files)
    except Exception as e:  # noqa: BLE001 - unreadable or inconsistent files
        raise DeployError(f"cannot read case {first} from {input_dir} with {type(reader).__name__}: {e}") from None
    if data.shape[0] != len(channel_names):
        raise DeployError(
            f"case {first} in {input_dir} has {data.shape[0]} channel(s) ({counts[first]} file(s)), but {model} "
            f"expects {len(channel_names)} ({', '.join(map(str, channel_names.values()))}); the images belong to "
            f"another dataset or -m points to the wrong export")
    return len(channels_per_case)


# ---- prediction --------------------------------------------------------------------------------------------------

def make_predictor(manifest: ExportManifest, folds: List[str], backend: str, use_mirroring: bool = True,
                   step_size: float = 0.5, threads: Optional[int] = None, allow_tqdm: bool = False):
    """An ``nnUNetPredictor`` (CPU) for ``folds`` of the export, ready for its ``predict_from_*`` methods: engines
    compiled for a runtime backend, checkpoints loaded by nnU-Net for ``torch`` (run it inside
    :func:`pytorch_only` for the PyTorch computation of this package's networks)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=allow_tqdm)
    if backend == TORCH_BACKEND:
        from nnunetv2_lgms.benchmark.models import ensure_ext_trainer
        ensure_ext_trainer()
        if threads:
            torch.set_num_threads(threads)
        predictor.initialize_from_trained_model_folder(
            str(manifest.folder), [f if f == "all" else int(f) for f in folds], manifest.checkpoint_name)
        return predictor
    plans_manager = PlansManager(read_json(manifest.folder / "plans.json"))
    switch = EngineSwitch(build_engines(manifest, folds, backend, threads))
    mirror_axes = manifest.inference_allowed_mirroring_axes
    predictor.manual_initialization(switch, plans_manager, plans_manager.get_configuration(manifest.configuration),
                                    [EngineSwitch.token(f) for f in folds],
                                    read_json(manifest.folder / "dataset.json"), manifest.trainer_name,
                                    tuple(mirror_axes) if mirror_axes is not None else None)
    predictor.network = switch  # manual_initialization may wrap it in torch.compile (nnUNet_compile=t): no use here
    return predictor


def predict_folder(input_dir, output_dir, model_dir, backend: Optional[str] = None,
                   folds: Optional[Sequence] = None, use_mirroring: bool = True, step_size: float = 0.5,
                   num_processes_preprocessing: int = 3, num_processes_export: int = 3, threads: Optional[int] = None,
                   save_probabilities: bool = False, prev_stage_predictions=None, allow_tqdm: bool = True,
                   log: Callable[[str], None] = print) -> Path:
    """Segment every case of ``input_dir`` into ``output_dir`` with the export in ``model_dir`` (see the module
    docstring). ``num_processes_* = 0`` runs nnU-Net's sequential variant (no worker processes). Everything is
    checked and every engine compiled before anything is written; predictions are written to a temporary folder
    beside ``output_dir`` and moved there at the end, so a failure leaves ``output_dir`` as it was."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    input_dir, output_dir = Path(input_dir).absolute(), Path(output_dir).absolute()
    manifest = ExportManifest.read(model_dir)
    backend = backend or manifest.default_backend()
    if backend not in BACKEND_CHOICES:
        raise DeployError(f"unsupported backend {backend!r}; choose --backend {', '.join(BACKEND_CHOICES)}")
    manifest.check_backend(backend)
    folds = manifest.select_folds([str(f) for f in folds] if folds else None)
    manifest.check_files(folds, backend)
    if not 0 < step_size <= 1:
        raise DeployError(f"-step_size must be in (0, 1], got {step_size}")
    if output_dir.exists() and not output_dir.is_dir():
        raise DeployError(f"-o {output_dir} is a file; give a folder")
    if output_dir == input_dir:
        raise DeployError("-o must differ from -i (predictions carry the case names of the images)")
    dataset_json = read_json(manifest.folder / "dataset.json")
    plans_manager = PlansManager(read_json(manifest.folder / "plans.json"))
    previous_stage = plans_manager.get_configuration(manifest.configuration).previous_stage_name
    if previous_stage is not None and not prev_stage_predictions:
        raise DeployError(f"{manifest.configuration} is a cascade stage: pass the {previous_stage} predictions of "
                          f"these images with -prev_stage_predictions")
    num_cases = check_inputs(input_dir, manifest, plans_manager, dataset_json)
    if backend != TORCH_BACKEND:
        engines._require(backend)
    log(f"{num_cases} case(s) from {input_dir}; model {manifest.describe()}; backend {backend}; mirroring "
        f"{'on' if use_mirroring else 'off'}")
    predictor = make_predictor(manifest, folds, backend, use_mirroring, step_size, threads, allow_tqdm)

    prev = str(prev_stage_predictions) if prev_stage_predictions else None
    with staged(output_dir, replace=False) as staging, pytorch_only(backend == TORCH_BACKEND):
        if num_processes_preprocessing == 0 or num_processes_export == 0:
            predictor.predict_from_files_sequential(str(input_dir), str(staging), save_probabilities=save_probabilities,
                                                    overwrite=True, folder_with_segs_from_prev_stage=prev)
        else:
            predictor.predict_from_files(str(input_dir), str(staging), save_probabilities=save_probabilities,
                                         overwrite=True, num_processes_preprocessing=num_processes_preprocessing,
                                         num_processes_segmentation_export=num_processes_export,
                                         folder_with_segs_from_prev_stage=prev)
        _record_run(staging, output_dir, manifest, backend, folds)
    return output_dir


def _record_run(staging: Path, output_dir: Path, manifest: ExportManifest, backend: str, folds: List[str]) -> None:
    """nnU-Net records the predictor's arguments in predict_from_raw_data_args.json: name the final folder there,
    not the staging one, and add what ran."""
    args_file = staging / "predict_from_raw_data_args.json"
    if args_file.is_file():
        args = json.loads(args_file.read_text())
        args["output_folder_or_list_of_truncated_output_files"] = str(output_dir)
        args["nnunetv2_lgms_deploy"] = {"model_folder": str(manifest.folder), "format": manifest.format,
                                        "backend": backend, "folds": folds}
        args_file.write_text(json.dumps(args, indent=4))


__all__ = ["CPU_RUNTIME_ENV", "EngineSwitch", "build_engines", "check_inputs", "make_predictor", "predict_folder",
           "pytorch_only"]
