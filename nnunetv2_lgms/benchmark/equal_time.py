"""Equal-time training: several wall-clock-budget trainers (``*_cpu45min``, or any
:class:`~nnunetv2_lgms.trainers.budget.WallClockBudget` trainer) take turns on one machine, step by step, until
each has spent its budget; then nnU-Net's final validation of each, and the validation Dice of every snapshot
against the training time it had used::

    python -m nnunetv2_lgms.benchmark.equal_time -d 553 -c 2d -f 0 \\
        -tr nnUNetTrainerBaseline_cpu45min nnUNetTrainerLGMSNet_cpu45min --out results/kvasir_equal_time

Taking turns makes the comparison fair on a machine that also does other work: a load that comes and goes falls on
every trainer alike, and each trainer's clock runs only during its own steps and epoch ends (``clock.json`` also
records the CPU seconds each got). Snapshots are scored on the fold's validation cases (sliding window without
mirroring, nnU-Net's metrics); the final checkpoint gets nnU-Net's own final validation (with mirroring), as
``nnUNetv2_train`` does.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

from nnunetv2_lgms.benchmark.models import BenchmarkError, ensure_ext_trainer, find_trainer_class, require_env
from nnunetv2_lgms.benchmark.tables import markdown_table, write_csv


def build_trainers(dataset: str, configuration: str, fold: str, trainers: Sequence[str], device: str,
                   plans_identifier: str = "nnUNetPlans", budget_minutes: Optional[float] = None,
                   snapshot_minutes: Optional[float] = None):
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_lgms.trainers.budget import WallClockBudget

    ensure_ext_trainer()
    for name in trainers:  # all checked before any is built
        if not issubclass(find_trainer_class(name), WallClockBudget):
            raise BenchmarkError(f"{name} has no wall-clock budget; use a *_cpu45min trainer or another "
                                 f"WallClockBudget subclass")
    out = []
    for name in trainers:
        with contextlib.redirect_stdout(sys.stderr):
            trainer = get_trainer_from_args(dataset, configuration, fold if fold == "all" else int(fold), name,
                                            plans_identifier, device=torch.device(device))
        if budget_minutes is not None:
            trainer.budget_minutes = budget_minutes
        if snapshot_minutes is not None:
            trainer.snapshot_minutes = snapshot_minutes
        out.append(trainer)
    return out


def train_in_turns(trainers: List, log=print) -> None:
    """``on_train_start`` for all, then one training step of each unfinished trainer in turn (each opening and
    closing its own epochs), then ``on_train_end``."""
    for trainer in trainers:
        trainer.on_train_start()
    in_epoch = {id(t): False for t in trainers}
    while True:
        active = [t for t in trainers if in_epoch[id(t)] or not t.budget_spent()]
        if not active:
            break
        for trainer in active:
            if not in_epoch[id(trainer)]:
                trainer.begin_epoch()
                in_epoch[id(trainer)] = True
            if not trainer.train_iteration():
                trainer.end_epoch()
                in_epoch[id(trainer)] = False
                log(f"{type(trainer).__name__}: {trainer.seconds_used:.0f} / {trainer.budget_seconds:.0f} s")
    for trainer in trainers:
        trainer.on_train_end()


def snapshots_of(trainer) -> List[Path]:
    return sorted(Path(trainer.output_folder).glob("checkpoint_t*s.pth"))


def score_snapshot(trainer, snapshot: Path, work: Path, device: str) -> dict:
    """Validation Dice of one snapshot: the fold's validation cases predicted by ``nnUNetPredictor`` (no mirroring),
    scored by nnU-Net's ``compute_metrics_on_folder2``."""
    import torch
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder = Path(trainer.output_folder_base)
    raw = require_env("nnUNet_raw") / trainer.plans_manager.dataset_name
    ending = trainer.dataset_json["file_ending"]
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    _, val_keys = trainer.do_split()
    images = create_lists_from_splitted_dataset_folder(str(raw / "imagesTr"), ending, val_keys)
    out = work / type(trainer).__name__ / snapshot.stem
    out.mkdir(parents=True)
    checkpoint = torch.load(snapshot, map_location="cpu", weights_only=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device(device),
                                perform_everything_on_device=device == "cuda", allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), [trainer.fold], checkpoint_name=snapshot.name)
    with contextlib.redirect_stdout(sys.stderr):
        predictor.predict_from_files_sequential(images, [str(out / k) for k in val_keys], save_probabilities=False,
                                                overwrite=True)
        compute_metrics_on_folder2(str(raw / "labelsTr"), str(out), str(folder / "dataset.json"),
                                             str(folder / "plans.json"), str(out / "summary.json"), num_processes=1,
                                             chill=True)  # (the reference folder holds every case)
    metrics = json.loads((out / "summary.json").read_text())
    return {"snapshot": snapshot.name, "minutes": round(checkpoint["budget_seconds_used"] / 60, 2),
            "cpu_minutes": round(checkpoint["cpu_seconds_used"] / 60, 2), "epoch": checkpoint["current_epoch"],
            "dice": metrics["foreground_mean"]["Dice"], "n_cases": len(val_keys)}


def final_validation_dice(trainer) -> Optional[float]:
    summary = Path(trainer.output_folder) / "validation" / "summary.json"
    return json.loads(summary.read_text())["foreground_mean"]["Dice"] if summary.is_file() else None


def render(rows: List[dict], finals: dict, meta: dict) -> str:
    trainers = list(finals)
    lines = [f"Equal-time training on {meta['dataset']} ({meta['configuration']}, fold {meta['fold']}), "
             f"{meta['budget_minutes']:g} minutes of wall-clock time each, taking turns step by step on "
             f"{meta['device']} ({meta['threads']} threads). Dice: foreground mean over the fold's "
             f"{meta['n_val']} validation cases (nnU-Net's metrics).", "",
             "Snapshots (sliding window, no mirroring):", "",
             markdown_table(["trainer", "training minutes", "CPU minutes", "epochs", "validation Dice"],
                            [[r["trainer"], f"{r['minutes']:.1f}", f"{r['cpu_minutes']:.1f}", r["epoch"],
                              f"{r['dice']:.4f}"] for r in rows]), "",
             "End of the budget (nnU-Net's final validation of checkpoint_final.pth, mirroring on):", "",
             markdown_table(["trainer", "training steps", "validation Dice"],
                            [[t, finals[t]["steps"], "–" if finals[t]["dice"] is None else f"{finals[t]['dice']:.4f}"]
                             for t in trainers])]
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(matplotlib.rcParamsDefault):  # nnU-Net's progress plot leaves seaborn's poster style set
        _draw(plt, rows, path)


def _draw(plt, rows: List[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for trainer in dict.fromkeys(r["trainer"] for r in rows):
        pts = [(r["minutes"], r["dice"]) for r in rows if r["trainer"] == trainer]
        ax.plot(*zip(*pts), marker="o", label=trainer)
    ax.set_xlabel("training wall-clock time (minutes)")
    ax.set_ylabel("validation Dice (no mirroring)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_lgms.benchmark.equal_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", required=True)
    parser.add_argument("-f", "--fold", default="0")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True)
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget-minutes", type=float, help="override the trainers' budget")
    parser.add_argument("--snapshot-minutes", type=float, help="override the trainers' snapshot interval")
    parser.add_argument("--no-final-validation", action="store_true")
    parser.add_argument("--score-only", action="store_true",
                        help="do not train: score the snapshots a finished run left in the trainers' folders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import torch

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        trainers = build_trainers(args.dataset, args.configuration, args.fold, args.trainers, args.device,
                                  args.plans, args.budget_minutes, args.snapshot_minutes)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.score_only:
        for trainer in trainers:
            clock = Path(trainer.output_folder) / "clock.json"
            trainer.epoch_times = json.loads(clock.read_text()) if clock.is_file() else []
    else:
        train_in_turns(trainers, log)
    if not (args.no_final_validation or args.score_only):
        for trainer in trainers:
            with contextlib.redirect_stdout(sys.stderr):
                trainer.perform_actual_validation()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nnunetv2_lgms_equal_time_") as tmp:
        for trainer in trainers:
            for snapshot in snapshots_of(trainer):
                row = {"trainer": type(trainer).__name__, **score_snapshot(trainer, snapshot, Path(tmp), args.device)}
                log(f"{row['trainer']} {row['snapshot']}: Dice {row['dice']:.4f}")
                rows.append(row)
    finals = {type(t).__name__: {"dice": final_validation_dice(t), "clock": t.epoch_times,
                                 "steps": sum(e["iterations"] for e in t.epoch_times)} for t in trainers}
    meta = {"dataset": trainers[0].plans_manager.dataset_name, "configuration": args.configuration,
            "fold": args.fold, "budget_minutes": trainers[0].budget_minutes, "device": args.device,
            "threads": torch.get_num_threads(), "n_val": rows[0]["n_cases"] if rows else 0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "equal_time.md").write_text(render(rows, finals, meta))
    (args.out / "equal_time.json").write_text(json.dumps({"meta": meta, "snapshots": rows, "final": finals},
                                                         indent=1))
    write_csv(args.out / "equal_time.csv", ["trainer", "minutes", "cpu_minutes", "epoch", "dice"],
              [[r["trainer"], r["minutes"], r["cpu_minutes"], r["epoch"], r["dice"]] for r in rows])
    if rows:
        plot(rows, args.out / "equal_time.png")
    print(render(rows, finals, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
