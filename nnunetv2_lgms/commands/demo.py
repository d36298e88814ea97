"""``nnunetv2_lgms demo``: the whole workflow on a synthetic dataset the package generates itself.

Generates lesion images in nnU-Net raw format, runs the stock ``nnUNetv2_plan_and_preprocess``, trains LGMSNet and
vanilla nnU-Net on the same short budget (``*_demo`` trainers, fold 0), predicts the held-out ``imagesTs`` with the
stock ``nnUNetv2_predict``, scores them with nnU-Net's own metrics and prints a table. Everything lives in
``--work-dir``; nothing outside it is touched.
"""
from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

MARKER = ".nnunetv2_lgms_demo"
DEFAULT_TRAINERS = ("nnUNetTrainerLGMSNet_demo", "nnUNetTrainerBaseline_demo")


def add_arguments(parser) -> None:
    parser.add_argument("--work-dir", default="nnunetv2_lgms_work/demo",
                        help="folder for the dataset, nnU-Net's folders, logs and results (default: %(default)s)")
    parser.add_argument("--3d", dest="three_d", action="store_true", help="3D volumes and 3d_fullres instead of 2D")
    parser.add_argument("-tr", "--trainers", nargs="+", default=list(DEFAULT_TRAINERS),
                        help="trainers to compare, first is the reference (default: %(default)s)")
    parser.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny dataset and the *_smoke budget: checks the pipeline in ~2 min, learns nothing")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier demo in --work-dir first")


def _dataset_settings(three_d: bool, smoke: bool) -> dict:
    if three_d:
        return dict(dim=3, dataset_id=991, configuration="3d_fullres",
                    num_train=6 if smoke else 16, num_test=2 if smoke else 4,
                    size=(16, 32, 32) if smoke else (16, 40, 40))
    return dict(dim=2, dataset_id=990, configuration="2d", num_train=6 if smoke else 40,
                num_test=2 if smoke else 10, size=(48, 48) if smoke else (96, 96))


def _prepare_work_dir(work: Path, overwrite: bool) -> None:
    import shutil
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise SystemExit(f"{work} exists and is not a demo folder; choose another --work-dir")
        if not overwrite:
            raise SystemExit(f"{work} holds an earlier demo; pass --overwrite to start again, or another --work-dir")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("created by nnunetv2_lgms demo; safe to delete\n")


def _num_parameters(trainer_name: str, dataset_id: int, configuration: str) -> int:
    """All parameters of the network as the trainer trains it (deep-supervision heads included)."""
    from nnunetv2_lgms.benchmark.models import build_network, find_trainer_class, load_plan_context
    from nnunetv2_lgms.networks.common import count_parameters
    network = build_network(find_trainer_class(trainer_name), load_plan_context(dataset_id, configuration))
    return count_parameters(network)


def run(args) -> int:
    import os

    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2

    from nnunetv2_lgms.nnunet_runner import CommandFailed, EpochReporter, nnunet_env, run_nnunet
    from nnunetv2_lgms.synthetic import make_dataset

    trainers = [t if args.smoke is False else t.replace("_demo", "_smoke") for t in args.trainers]
    settings = _dataset_settings(args.three_d, args.smoke)
    work = Path(args.work_dir).resolve()
    _prepare_work_dir(work, args.overwrite)
    env = nnunet_env(work, args.device)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")})
    logs = work / "logs"
    cfg, dataset_id = settings["configuration"], settings["dataset_id"]
    started = time.perf_counter()

    print(f"[1/4] generating a synthetic {settings['dim']}D dataset in {work / 'nnUNet_raw'}")
    raw = make_dataset(env["nnUNet_raw"], dataset_id, dim=settings["dim"], num_train=settings["num_train"],
                       num_test=settings["num_test"], size=settings["size"])
    print(f"      {settings['num_train']} training + {settings['num_test']} held-out cases of {settings['size']}")
    try:
        print(f"[2/4] nnUNetv2_plan_and_preprocess -d {dataset_id} -c {cfg}")
        run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", cfg, "-np", "2",
                    "--verify_dataset_integrity"], env, logs / "plan_and_preprocess.log")
        plans_dir = Path(env["nnUNet_preprocessed"]) / raw.name
        rows = []
        for i, trainer in enumerate(trainers):
            print(f"[3/4] ({i + 1}/{len(trainers)}) nnUNetv2_train {dataset_id} {cfg} 0 -tr {trainer} -device {args.device}")
            train_s = run_nnunet(["nnUNetv2_train", dataset_id, cfg, "0", "-tr", trainer, "-device", args.device],
                                 env, logs / f"train_{trainer}.log", EpochReporter("     "))
            pred_dir = work / "predictions" / trainer
            print(f"      nnUNetv2_predict on {settings['num_test']} held-out cases")
            predict_s = run_nnunet(["nnUNetv2_predict", "-i", raw / "imagesTs", "-o", pred_dir, "-d", dataset_id,
                                    "-c", cfg, "-f", "0", "-tr", trainer, "-device", args.device,
                                    "-npp", "1", "-nps", "1", "--disable_progress_bar"],
                                   env, logs / f"predict_{trainer}.log")
            with contextlib.redirect_stdout(io.StringIO()):
                compute_metrics_on_folder2(str(raw / "labelsTs"), str(pred_dir), str(raw / "dataset.json"),
                                           str(plans_dir / "nnUNetPlans.json"), str(pred_dir / "summary.json"),
                                           num_processes=1)
            metrics = json.loads((pred_dir / "summary.json").read_text())
            rows.append({"trainer": trainer, "params": _num_parameters(trainer, dataset_id, cfg),
                         "dice_test": metrics["foreground_mean"]["Dice"], "train_s": train_s, "predict_s": predict_s})
    except CommandFailed as e:
        print(f"\nFAILED: {e}")
        return 1

    print(f"[4/4] held-out Dice (nnU-Net's metrics) after {time.perf_counter() - started:.0f} s in total\n")
    table = _table(rows, cfg)
    print(table)
    (work / "demo_results.json").write_text(json.dumps(rows, indent=2))
    (work / "demo_results.md").write_text(table + "\n")
    print(f"\nWritten: {work / 'demo_results.md'}, {work / 'demo_results.json'}; nnU-Net logs in {logs}")
    return 0


def _table(rows, configuration: str) -> str:
    ref = rows[0]
    lines = [f"| trainer ({configuration}) | params | Dice (held-out) | train time | predict time | params vs first |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['trainer']} | {r['params'] / 1e6:.2f}M | {r['dice_test']:.3f} | {r['train_s']:.0f} s | "
                     f"{r['predict_s']:.0f} s | {r['params'] / ref['params']:.2f}x |")
    return "\n".join(lines)
