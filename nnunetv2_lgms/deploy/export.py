"""Export trained folds for a CPU runtime: one model per fold at the plan's patch size, checked against PyTorch.

For each fold, the network is built as nnU-Net's predictor builds it (trainer class from the checkpoint's
``trainer_name`` through nnU-Net's lookup, ``build_network_architecture(..., enable_deep_supervision=False)``, the
checkpoint's ``network_weights``), turned into its reference form, converted, read back from disk by every runtime
that can run the format, and compared with PyTorch on a fresh random patch. A difference beyond the tolerance, or a
failed conversion, stops the export with the module responsible named
(:func:`~nnunetv2_lgms.deploy.verify.locate_divergence`).

The batch axis of the models is dynamic; the check runs batch 1, what nnU-Net's predictor feeds (a second batch
size would double the check's memory, and ONNX Runtime already needs several GB for LGMSNet's attention at large 2D
patches).

The folder (layout in :mod:`~nnunetv2_lgms.deploy.manifest`) is built in a temporary folder beside ``-o`` and moved
into place only when every fold has passed, so a failure leaves ``-o`` as it was.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from nnunetv2_lgms.deploy import engines, verify
from nnunetv2_lgms.deploy.manifest import (FORMAT_BACKENDS, FORMATS, MANIFEST_NAME, MODEL_FILES, DeployError,
                                           fold_dir_name, manifest_dict, read_json)
from nnunetv2_lgms.deploy.staging import staged

# what the predictor reads from a checkpoint (nnUNetPredictor.initialize_from_trained_model_folder)
CHECKPOINT_KEYS = ("network_weights", "trainer_name", "init_args", "inference_allowed_mirroring_axes")


def _versions() -> dict:
    versions = {}
    for dist in ("nnunetv2-lgms", "nnunetv2", "torch", "openvino", "onnxruntime", "onnx", "onnxscript"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _require_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DeployError(f"unsupported format {fmt!r}; choose --format {' or '.join(FORMATS)}")
    if fmt == "onnx":
        engines._require("onnx-export")
        engines._require("onnxruntime")  # the export is checked on it
    else:
        engines._require("openvino")


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise DeployError(f"-o {output} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise DeployError(f"-o {output} exists and is not empty; pass --overwrite to replace it, or choose another "
                          f"folder")


def _source_folder(dataset: str, trainer: str, plans_identifier: str, configuration: str) -> Path:
    from nnunetv2_lgms.benchmark.models import results_folder
    folder = results_folder(dataset, trainer, plans_identifier, configuration)
    if not folder.is_dir():
        present = sorted(p.name for p in folder.parent.glob("*__*__*")) if folder.parent.is_dir() else []
        hint = f" (trained models of {dataset}: {', '.join(present)})" if present else ""
        raise DeployError(f"no trained model at {folder}{hint}; train it with nnUNetv2_train {dataset} {configuration} "
                          f"FOLD -tr {trainer} -p {plans_identifier}, or fix -d/-c/-tr/-p")
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise DeployError(f"{folder / name} is missing (nnUNetv2_train writes it when training starts); is "
                              f"{folder} a complete nnU-Net results folder?")
    return folder


def _load_checkpoints(folder: Path, folds: Sequence[str], checkpoint_name: str, configuration: str) -> dict:
    """Every requested fold's checkpoint, after checking they all exist and agree."""
    missing = [f for f in folds if not (folder / fold_dir_name(f) / checkpoint_name).is_file()]
    if missing:
        have = sorted(p.parent.name[len("fold_"):] for p in folder.glob(f"fold_*/{checkpoint_name}"))
        raise DeployError(
            f"fold(s) {', '.join(missing)} of {folder} have no {checkpoint_name} (folds that have one: "
            f"{', '.join(have) or 'none'}); train them (nnUNetv2_train ... FOLD), export only those that exist "
            f"(-f {' '.join(have) or 'FOLD'}), or pick another checkpoint with -chk")
    checkpoints = {}
    for fold in folds:
        path = folder / fold_dir_name(fold) / checkpoint_name
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise DeployError(f"cannot read {path}: {e}") from None
        if not isinstance(checkpoint, dict) or not {"network_weights", "trainer_name"} <= set(checkpoint):
            raise DeployError(f"{path} is not an nnU-Net checkpoint (no network_weights/trainer_name)")
        trained = checkpoint.get("init_args", {}).get("configuration", configuration)
        if trained != configuration:
            raise DeployError(f"{path} was trained for configuration {trained!r}, not {configuration!r}")
        checkpoints[fold] = checkpoint
    names = {c["trainer_name"] for c in checkpoints.values()}
    if len(names) > 1:
        raise DeployError(f"the folds' checkpoints name different trainers ({', '.join(sorted(names))})")
    return checkpoints


def _convert(reference, example, fmt: str, fold_dir: Path) -> Path:
    if fmt == "onnx":
        return engines.export_onnx(reference, example, fold_dir / MODEL_FILES["onnx"], dynamic_batch=True)
    return engines.save_openvino(engines.openvino_model(reference, example, dynamic_batch=True),
                                 fold_dir / MODEL_FILES["openvino"])


def _compile(backend: str, model_file: Path):
    if backend == "onnxruntime":
        return engines.compile_onnxruntime(model_file)
    return engines.compile_openvino(model_file)


def _offender(reference, input_shape, backend: str, tolerance: float, what: str) -> str:
    finding = verify.locate_divergence(reference, input_shape, backend, tolerance, reason=what)
    return finding.describe()


def export_folds(dataset, configuration: str, trainer: str, folds: Sequence, output, fmt: str,
                 plans_identifier: str = "nnUNetPlans", checkpoint_name: str = "checkpoint_final.pth",
                 overwrite: bool = False, tolerance: float = verify.DEFAULT_TOLERANCE,
                 log: Callable[[str], None] = print) -> Path:
    """Export ``folds`` of ``$nnUNet_results/DATASET/TRAINER__PLANS__CONFIG`` to ``output`` in ``fmt``
    (``onnx`` or ``openvino``); returns ``output``. See the module docstring."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_lgms.benchmark.models import dataset_name, find_trainer_class

    _require_format(fmt)
    output = Path(output).absolute()
    _check_output(output, overwrite)
    folds = [str(f) for f in folds]
    if len(set(folds)) != len(folds):
        raise DeployError(f"-f lists a fold twice: {' '.join(folds)}")
    dataset = dataset_name(dataset)
    source = _source_folder(dataset, trainer, plans_identifier, configuration)
    checkpoints = _load_checkpoints(source, folds, checkpoint_name, configuration)

    plans, dataset_json = read_json(source / "plans.json"), read_json(source / "dataset.json")
    plans_manager = PlansManager(plans)
    if configuration not in plans_manager.available_configurations:
        raise DeployError(f"configuration {configuration!r} is not in {source / 'plans.json'}")
    configuration_manager = plans_manager.get_configuration(configuration)
    trainer_name = next(iter(checkpoints.values()))["trainer_name"]
    trainer_class = find_trainer_class(trainer_name)  # the class nnU-Net's predictor would use
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    label_manager = plans_manager.get_label_manager(dataset_json)
    num_outputs = label_manager.num_segmentation_heads
    patch_size = [int(s) for s in configuration_manager.patch_size]
    input_shape = (num_inputs, *patch_size)
    if "plans_manager" not in inspect.signature(trainer_class.build_network_architecture).parameters:
        raise DeployError(f"{trainer_name} has the pre-2.7 build_network_architecture signature; export supports the "
                          f"nnU-Net 2.7+ one (plans_manager, configuration_manager, num_input_channels, "
                          f"num_output_channels, enable_deep_supervision)")
    network = trainer_class.build_network_architecture(plans_manager, configuration_manager, num_inputs, num_outputs,
                                                       enable_deep_supervision=False)
    backends = [b for b in FORMAT_BACKENDS[fmt] if b in engines.available_backends()]

    with staged(output, replace=True) as staging:
        fold_entries = []
        for fold in folds:
            checkpoint = checkpoints[fold]
            network.load_state_dict(checkpoint["network_weights"])
            reference = engines.reference_network(network)
            fold_dir = staging / fold_dir_name(fold)
            fold_dir.mkdir()
            example = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
            log(f"fold {fold}: converting {type(reference).__name__} ({trainer_name}) to {fmt} at patch "
                f"{'x'.join(map(str, patch_size))}, {num_inputs} input channel(s)")
            start = time.perf_counter()
            try:
                model_file = _convert(reference, example, fmt, fold_dir)
            except Exception as e:  # noqa: BLE001 - reported with the module that fails
                summary = verify.summarize_error(e)
                log(f"fold {fold}: conversion failed ({summary}); locating the module ...")
                culprit = _offender(reference, input_shape, FORMAT_BACKENDS[fmt][0], tolerance,
                                    f"conversion failed: {summary}")
                raise DeployError(f"fold {fold}: {trainer_name}'s network does not convert to {fmt}. Offending "
                                  f"module: {culprit}") from e
            checks = {}
            for backend in backends:
                comparison = verify.compare(reference, _compile(backend, model_file), input_shape, tolerance,
                                            batch_sizes=(1,))
                checks[backend] = comparison.as_dict()
                log(f"fold {fold}: {backend} against torch: max |logit difference| {comparison.max_abs_diff:.3g} "
                    f"(tolerance {comparison.tolerance:.3g})")
                if not comparison.ok:
                    log(f"fold {fold}: locating the module that differs ...")
                    culprit = _offender(reference, input_shape, backend, tolerance,
                                        f"max |difference| {comparison.max_abs_diff:.3g} > {comparison.tolerance:.3g}")
                    raise DeployError(
                        f"fold {fold}: the {fmt} model run by {backend} differs from PyTorch (max |logit "
                        f"difference| {comparison.max_abs_diff:.3g} > tolerance {comparison.tolerance:.3g}, relative "
                        f"{tolerance:g}). Offending module: {culprit}")
            torch.save({k: checkpoint[k] for k in CHECKPOINT_KEYS if k in checkpoint}, fold_dir / checkpoint_name)
            fold_entries.append({"fold": fold, "model": str(model_file.relative_to(staging)),
                                 "checkpoint": f"{fold_dir_name(fold)}/{checkpoint_name}",
                                 "seconds_to_convert": round(time.perf_counter() - start, 1), "checks": checks})

        for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        mirror_axes = next(iter(checkpoints.values())).get("inference_allowed_mirroring_axes")
        manifest = manifest_dict(
            format=fmt, dataset_name=dataset, configuration=configuration, plans_identifier=plans_identifier,
            trainer_name=trainer_name, requested_trainer=trainer, checkpoint_name=checkpoint_name,
            source=str(source), folds=fold_entries, patch_size=patch_size, num_input_channels=num_inputs,
            num_output_channels=num_outputs, channel_names=dataset_json.get("channel_names",
                                                                             dataset_json.get("modality")),
            file_ending=dataset_json["file_ending"], labels=dataset_json["labels"],
            regions_class_order=dataset_json.get("regions_class_order"),
            inference_allowed_mirroring_axes=list(mirror_axes) if mirror_axes is not None else None,
            input_name=engines.INPUT_NAME, output_name=engines.OUTPUT_NAME, dynamic_batch=True,
            dtype="float32", relative_tolerance=tolerance,
            network_class=f"{type(reference).__module__}.{type(reference).__name__}", versions=_versions())
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    log(f"exported {len(folds)} fold(s) of {dataset} {configuration} {trainer_name} as {fmt} to {output}")
    return output


__all__ = ["CHECKPOINT_KEYS", "export_folds"]
