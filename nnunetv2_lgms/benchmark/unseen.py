"""Zero-shot evaluation: a model trained on a source dataset predicts a converted unseen target dataset.

The prediction goes through nnU-Net's own ``nnUNetPredictor`` (``initialize_from_trained_model_folder`` with one
fold or several folds as an ensemble, exactly as ``nnUNetv2_predict -f 0 1 2``), and the scores are nnU-Net's own
(``compute_metrics_on_folder2`` with the target's reference labels and the *source* model's label map), so the
numbers are those ``nnUNetv2_evaluate_folder`` would give. The converters put zero-shot targets in ``imagesTr``/
``labelsTr``; ``imagesTs``/``labelsTs`` are used when there is no ``imagesTr``.
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

from nnunetv2_lgms.benchmark.models import (BenchmarkError, dataset_name, ensure_ext_trainer, require_env,
                                            results_folder)
from nnunetv2_lgms.benchmark.tables import markdown_table, write_csv
from nnunetv2_lgms.networks.common import inference_parameters


@dataclass
class Target:
    name: str
    folder: Path
    dataset_json: dict
    images: Path
    labels: Path


def resolve_target(target: str, split: str = "auto") -> Target:
    """``target``: a dataset ID/name under ``$nnUNet_raw`` or a dataset folder (with dataset.json)."""
    path = Path(target).expanduser()
    if not path.is_dir():
        path = require_env("nnUNet_raw") / dataset_name(target)
        if not path.is_dir():
            raise BenchmarkError(f"target {target!r}: {path} does not exist")
    if not (path / "dataset.json").is_file():
        raise BenchmarkError(f"target {target!r}: no dataset.json in {path}")
    dataset_json = json.loads((path / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    splits = ["Tr", "Ts"] if split == "auto" else [split]
    for s in splits:
        images, labels = path / f"images{s}", path / f"labels{s}"
        if images.is_dir() and any(p.name.endswith(ending) for p in images.iterdir()):
            if not labels.is_dir():
                raise BenchmarkError(f"target {path.name}: {images} has images but {labels} does not exist")
            return Target(path.name, path, dataset_json, images, labels)
    raise BenchmarkError(f"target {path.name}: no *{ending} images in {' or '.join(str(path / f'images{s}') for s in splits)}")


def _label_map(dataset_json: dict) -> Dict[str, object]:
    """Label/region values by name, normalised (ints, tuples), without the ignore label."""
    out = {}
    for name, value in dataset_json["labels"].items():
        if name == "ignore":
            continue
        out[name] = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)
    return out


def check_compatible(source_json: dict, target: Target, source_label: str) -> List[str]:
    """Raise :class:`BenchmarkError` when the target cannot be scored with the source model; return warnings."""
    sc, tc = source_json["channel_names"], target.dataset_json["channel_names"]
    if len(sc) != len(tc):
        raise BenchmarkError(f"channel mismatch: target {target.name} has {len(tc)} input channel(s) "
                             f"{list(tc.values())} but {source_label} was trained on {len(sc)} {list(sc.values())} "
                             f"(dataset.json channel_names); convert the target with the source's channels")
    if source_json["file_ending"] != target.dataset_json["file_ending"]:
        raise BenchmarkError(f"file ending mismatch: target {target.name} has {target.dataset_json['file_ending']}, "
                             f"{source_label} expects {source_json['file_ending']}")
    smap, tmap = _label_map(source_json), _label_map(target.dataset_json)
    if sorted(map(str, smap.values())) != sorted(map(str, tmap.values())) or \
            source_json.get("regions_class_order") != target.dataset_json.get("regions_class_order"):
        raise BenchmarkError(f"label map mismatch: target {target.name} has labels {tmap}, {source_label} has "
                             f"{smap} (dataset.json labels{', regions_class_order' if 'regions_class_order' in source_json else ''})")
    warnings = []
    if smap != tmap:
        warnings.append(f"{target.name}: same label values as {source_label} but other names ({tmap} vs {smap})")
    return warnings


def model_folder(source: str, trainer: str, plans_identifier: str, configuration: str, folds: Sequence[str],
                 checkpoint: str) -> Path:
    folder = results_folder(source, trainer, plans_identifier, configuration)
    if not folder.is_dir():
        raise BenchmarkError(f"{trainer}: no trained model, {folder} does not exist")
    missing = [str(folder / f"fold_{f}" / checkpoint) for f in folds if not (folder / f"fold_{f}" / checkpoint).is_file()]
    if missing:
        raise BenchmarkError(f"{trainer}: missing checkpoint(s): {', '.join(missing)}")
    return folder


def predict_and_score(folder: Path, folds: Sequence[str], checkpoint: str, target: Target, out: Path, device: str,
                      step_size: float = 0.5, mirroring: bool = True, num_processes: int = 0) -> dict:
    """Predict ``target.images`` with the (ensemble of) fold(s) and score against ``target.labels``."""
    ensure_ext_trainer()
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's progress chatter; stdout is for the table
        return _predict_and_score(folder, folds, checkpoint, target, out, device, step_size, mirroring,
                                  num_processes)


def _predict_and_score(folder, folds, checkpoint, target, out, device, step_size, mirroring, num_processes) -> dict:
    import torch
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=device == "cuda", device=torch.device(device),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), [int(f) if f != "all" else f for f in folds],
                                                   checkpoint_name=checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    if num_processes > 0:
        predictor.predict_from_files(str(target.images), str(out), save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=num_processes,
                                     num_processes_segmentation_export=num_processes)
    else:
        predictor.predict_from_files_sequential(str(target.images), str(out), save_probabilities=False,
                                                overwrite=True)
    summary_file = out / "summary.json"
    compute_metrics_on_folder2(str(target.labels), str(out), str(folder / "dataset.json"), str(folder / "plans.json"),
                               str(summary_file), num_processes=max(1, num_processes), chill=False)
    summary = json.loads(summary_file.read_text())
    return {"params": inference_parameters(predictor.network), "summary_file": str(summary_file),
            "n_cases": len(summary["metric_per_case"]),
            "dice": summary["foreground_mean"]["Dice"], "iou": summary["foreground_mean"]["IoU"],
            "per_class": {k: {"Dice": v["Dice"], "IoU": v["IoU"]} for k, v in summary["mean"].items()}}


def evaluate_unseen(source, configuration: str, trainers: Sequence[str], folds: Sequence[str], targets: Sequence[str],
                    out: Path, device: str = "cpu", plans_identifier: str = "nnUNetPlans",
                    checkpoint: str = "checkpoint_final.pth", split: str = "auto", step_size: float = 0.5,
                    mirroring: bool = True, num_processes: int = 0, log=print) -> dict:
    source_name = dataset_name(source)
    folds = [str(f) for f in folds]
    resolved = [resolve_target(t, split) for t in targets]
    folders = {t: model_folder(source_name, t, plans_identifier, configuration, folds, checkpoint) for t in trainers}
    warnings = []
    for trainer, folder in folders.items():  # everything is checked before the first prediction
        source_json = json.loads((folder / "dataset.json").read_text())
        for target in resolved:
            warnings += check_compatible(source_json, target, f"{source_name} ({trainer})")
    rows = []
    for trainer, folder in folders.items():
        row = {"trainer": trainer, "source": source_name, "configuration": configuration, "plans": plans_identifier,
               "folds": folds, "checkpoint": checkpoint, "targets": {}}
        for target in resolved:
            pred_dir = out / "predictions" / trainer / target.name
            log(f"{trainer} (folds {' '.join(folds)}) -> {target.name}: predicting {target.images} ...")
            res = predict_and_score(folder, folds, checkpoint, target, pred_dir, device, step_size, mirroring,
                                    num_processes)
            row["params"] = res.pop("params")
            res["predictions"] = str(pred_dir)
            row["targets"][target.name] = res
        rows.append(row)
    result = {"source": source_name, "configuration": configuration, "plans": plans_identifier, "folds": folds,
              "device": device, "mirroring": mirroring, "step_size": step_size,
              "targets": {t.name: str(t.images) for t in resolved}, "rows": rows, "warnings": warnings}
    write_outputs(result, out)
    return result


def render_markdown(result: dict) -> str:
    targets = list(result["targets"])
    headers = ["trainer"] + [h for t in targets for h in (f"{t} Dice (%)", f"{t} IoU (%)")] + ["params"]
    rows = []
    for r in result["rows"]:
        cells = [r["trainer"]]
        for t in targets:
            res = r["targets"][t]
            cells += [f"{100 * res['dice']:.2f}", f"{100 * res['iou']:.2f}"]
        cells.append(f"{r['params'] / 1e6:.2f}M")
        rows.append(cells)
    folds = " ".join(result["folds"])
    lines = [f"Zero-shot: trained on {result['source']} ({result['configuration']}, {result['plans']}, "
             f"fold{'s' if len(result['folds']) > 1 else ''} {folds}"
             f"{' ensembled' if len(result['folds']) > 1 else ''}), predicted with nnUNetPredictor "
             f"(mirroring {'on' if result['mirroring'] else 'off'}, step {result['step_size']}), scored with "
             f"nnU-Net's metrics (foreground mean over cases)", "",
             markdown_table(headers, rows)]
    n_cases = {t: result["rows"][0]["targets"][t]["n_cases"] for t in targets} if result["rows"] else {}
    lines += ["", "cases: " + ", ".join(f"{t} {n}" for t, n in n_cases.items())]
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "unseen.md").write_text(render_markdown(result))
    (out / "unseen.json").write_text(json.dumps(result, indent=2))
    rows = [[r["trainer"], t, res["n_cases"], res["dice"], res["iou"], r["params"], " ".join(r["folds"])]
            for r in result["rows"] for t, res in r["targets"].items()]
    write_csv(out / "unseen.csv", ["trainer", "target", "n_cases", "dice", "iou", "params", "folds"], rows)

