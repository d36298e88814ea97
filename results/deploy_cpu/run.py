"""End-to-end CPU prediction time per case: nnU-Net's network and LGMSNet in PyTorch, on ONNX Runtime and on
OpenVINO, each through nnU-Net's own pipeline (preprocessing, Gaussian sliding window with mirroring, resampling,
export of the segmentation), on one real image at native resolution per dataset:

* ``kvasir``: the first Kvasir-SEG image (RGB, ``2d``), converted with ``nnunetv2_lgms convert kvasir``;
* ``hippocampus``: the first MSD Task04 Hippocampus volume (``3d_fullres``), converted with
  ``nnUNetv2_convert_MSD_dataset``.

Timing needs no trained weights: every model is an untrained fold-0 checkpoint written by its trainer
(``nnunetv2_lgms.deploy.checkpoints``), exported with ``nnunetv2_lgms export``. Planning runs
``nnUNetv2_plan_and_preprocess --no_pp`` (fingerprint and plans, no preprocessed data). Everything is built once
under ``--work-dir`` (outside the repository's tracked files) and reused by later runs.

Variants (network / runtime):

* ``nnunet/torch``: nnU-Net's network in PyTorch, i.e. what stock ``nnUNetv2_predict -device cpu`` computes
  (the reference of the ratios);
* ``nnunet/onnxruntime``, ``nnunet/openvino``: the same checkpoint exported;
* ``lgmsnet/torch``: LGMSNet's PyTorch computation (``nnUNet_lgms_cpu_runtime=torch``);
* ``lgmsnet/default``: LGMSNet as stock ``nnUNetv2_predict`` runs it with this package's defaults;
* ``lgmsnet/onnxruntime``, ``lgmsnet/openvino``: the exported checkpoint.

Each variant is one ``nnUNetPredictor`` built once per thread count (model loading and runtime compilation are not
timed); a measurement is one call of its ``predict_from_files_sequential`` on the case (no worker processes, so
``--threads`` is the whole budget: ``torch.set_num_threads`` and the runtimes' thread settings). Repetitions are
interleaved (every variant once per round, the starting variant rotating), after unrecorded warm-up rounds. The
segmentation of each runtime variant is compared with its network's PyTorch one (fraction of equal pixels).

    python results/deploy_cpu/run.py --threads 1 2 --repeats 5                 # the measurement
    python results/deploy_cpu/run.py --repeats 1 --warmup 0 --threads 1 --out nnunetv2_lgms_work/deploy_cpu/dry_run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[2]
DATASETS = {
    "kvasir": {"id": 503, "configuration": "2d", "ending": ".png"},
    "hippocampus": {"id": 4, "configuration": "3d_fullres", "ending": ".nii.gz"},
}
TRAINERS = {"nnunet": "nnUNetTrainer", "lgmsnet": "nnUNetTrainerLGMSNet"}
VARIANTS = [("nnunet", "torch"), ("nnunet", "onnxruntime"), ("nnunet", "openvino"), ("lgmsnet", "torch"),
            ("lgmsnet", "default"), ("lgmsnet", "onnxruntime"), ("lgmsnet", "openvino")]
FORMAT_OF = {"onnxruntime": "onnx", "openvino": "openvino", "torch": "onnx", "default": "onnx"}


def log(message: str) -> None:
    print(f"[deploy_cpu] {message}", file=sys.stderr, flush=True)


def run(cmd: List[str], env: Dict[str, str], log_file: Path) -> None:
    from nnunetv2_lgms.nnunet_runner import run_nnunet
    run_nnunet(cmd, env, log_file)


def msd_source(source: Path, work: Path) -> Path:
    """``source`` itself, or, for a release without ``imagesTs`` (nnUNetv2_convert_MSD_dataset requires the folder),
    a folder of the same name in the work folder whose entries link to the release's, with an empty imagesTs."""
    if (source / "imagesTs").is_dir():
        return source
    shim = work / "sources" / source.name
    if not shim.is_dir():
        shim.mkdir(parents=True)
        for entry in ("imagesTr", "labelsTr", "dataset.json"):
            (shim / entry).symlink_to(source.absolute() / entry)
        (shim / "imagesTs").mkdir()
    return shim


def prepare_dataset(name: str, source: Path, work: Path, env: Dict[str, str]) -> Path:
    """Convert and plan the dataset once; returns its raw folder."""
    from nnunetv2_lgms.nnunet_runner import console_script
    spec = DATASETS[name]
    raw_root = Path(env["nnUNet_raw"])
    found = sorted(raw_root.glob(f"Dataset{spec['id']:03d}_*"))
    if not found:
        log(f"{name}: converting {source}")
        if name == "kvasir":
            import subprocess
            subprocess.run([console_script("nnunetv2_lgms"), "convert", "kvasir", str(source), "--id", str(spec["id"]),
                            "-np", "2", "--no-progress"], env=env, check=True)
        else:
            run(["nnUNetv2_convert_MSD_dataset", "-i", msd_source(source, work), "-np", "2"], env,
                work / "logs" / f"convert_{name}.log")
        found = sorted(raw_root.glob(f"Dataset{spec['id']:03d}_*"))
    raw = found[0]
    plans = Path(env["nnUNet_preprocessed"]) / raw.name / "nnUNetPlans.json"
    if not plans.is_file():
        log(f"{name}: fingerprint and plans (nnUNetv2_plan_and_preprocess --no_pp)")
        run(["nnUNetv2_plan_and_preprocess", "-d", spec["id"], "--no_pp", "-np", "2"], env,
            work / "logs" / f"plan_{name}.log")
    return raw


def prepare_case(name: str, raw: Path, work: Path) -> Path:
    """A folder with the dataset's first training image (a copy inside the work folder)."""
    ending = DATASETS[name]["ending"]
    folder = work / "cases" / name
    if not folder.is_dir():
        first = sorted((raw / "imagesTr").glob(f"*_0000{ending}"))[0]
        case = first.name[: -len("_0000" + ending)]
        folder.mkdir(parents=True)
        for f in sorted((raw / "imagesTr").glob(f"{case}_*{ending}")):
            shutil.copyfile(f, folder / f.name)
    return folder


def prepare_models(name: str, work: Path, env: Dict[str, str]) -> Dict[str, Dict[str, Path]]:
    """Untrained fold-0 checkpoints and their ONNX and OpenVINO exports: {network: {format: export folder}}."""
    from nnunetv2_lgms.cli import main as cli
    from nnunetv2_lgms.deploy.checkpoints import write_untrained_fold
    from nnunetv2_lgms.deploy.manifest import MANIFEST_NAME
    spec = DATASETS[name]
    exports: Dict[str, Dict[str, Path]] = {}
    for network, trainer in TRAINERS.items():
        results = Path(env["nnUNet_results"])
        fold = next(results.glob(f"Dataset{spec['id']:03d}_*/{trainer}__nnUNetPlans__{spec['configuration']}/fold_0"),
                    None)
        if fold is None or not (fold / "checkpoint_final.pth").is_file():
            log(f"{name}: untrained checkpoint of {trainer}")
            write_untrained_fold(spec["id"], spec["configuration"], trainer, 0)
        exports[network] = {}
        for fmt in ("onnx", "openvino"):
            out = work / "exports" / name / f"{network}_{fmt}"
            if not (out / MANIFEST_NAME).is_file():
                log(f"{name}: exporting {trainer} as {fmt}")
                rc = cli(["export", "-d", str(spec["id"]), "-c", spec["configuration"], "-tr", trainer, "-f", "0",
                          "-o", str(out), "--format", fmt, "--overwrite"])
                if rc != 0:
                    raise SystemExit(f"export of {trainer} ({fmt}) failed")
            exports[network][fmt] = out
    return exports


def build_predictors(exports, threads: int, step_size: float):
    from nnunetv2_lgms.deploy.manifest import ExportManifest
    from nnunetv2_lgms.deploy.predictor import make_predictor
    predictors = {}
    for network, runtime in VARIANTS:
        manifest = ExportManifest.read(exports[network][FORMAT_OF[runtime]])
        backend = "torch" if runtime == "default" else runtime
        predictors[network, runtime] = make_predictor(manifest, ["0"], backend, use_mirroring=True,
                                                      step_size=step_size, threads=threads)
    return predictors


def predict_once(predictor, runtime: str, case_dir: Path, ending: str, out_dir: Path, threads: int) -> float:
    import torch
    from nnunetv2_lgms.deploy.predictor import pytorch_only
    files = [[str(p) for p in sorted(case_dir.glob(f"*{ending}"))]]
    case = Path(files[0][0]).name[: -len("_0000" + ending)]
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    with pytorch_only(runtime == "torch"):
        start = time.perf_counter()
        predictor.predict_from_files_sequential(files, [str(out_dir / case)], save_probabilities=False,
                                                overwrite=True)
        return time.perf_counter() - start


def agreement(a: Path, b: Path) -> float:
    import SimpleITK as sitk
    x = sitk.GetArrayFromImage(sitk.ReadImage(str(a)))
    y = sitk.GetArrayFromImage(sitk.ReadImage(str(b)))
    return float((x == y).mean()) if x.shape == y.shape else 0.0


def machine() -> dict:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     "")
    except OSError:
        pass
    import importlib.metadata as md
    versions = {}
    for dist in ("torch", "nnunetv2", "openvino", "onnxruntime", "nnunetv2-lgms"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "platform": platform.platform(), "versions": versions,
            "load_average_at_start": os.getloadavg()}


def markdown(result: dict) -> str:
    lines = [f"CPU: {result['machine']['cpu']} ({result['machine']['cpu_count']} logical cores); "
             f"load average at start {', '.join(f'{x:.2f}' for x in result['machine']['load_average_at_start'])}, "
             f"at end {', '.join(f'{x:.2f}' for x in result['load_average_at_end'])}.", "",
             "| dataset | threads | network | runtime | median s/case | min | samples | vs nnU-Net torch | "
             "equal pixels vs same network torch |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        equal = "" if row["agreement"] is None else f"{100 * row['agreement']:.3f} %"
        lines.append(f"| {row['dataset']} | {row['threads']} | {row['network']} | {row['runtime']} | "
                     f"{row['median_s']:.3f} | {row['min_s']:.3f} | {len(row['samples_s'])} | "
                     f"{row['ratio_vs_nnunet_torch']:.2f}x | {equal} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--kvasir", type=Path, default=Path("/work/shared/data/Kvasir-SEG"))
    parser.add_argument("--hippocampus", type=Path, default=Path("/work/shared/data/Task04_Hippocampus"))
    parser.add_argument("--work-dir", type=Path, default=REPO / "nnunetv2_lgms_work" / "deploy_cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="where deploy_cpu.json/.md go (default: this folder)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds per thread count (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first (default 1)")
    parser.add_argument("--step-size", type=float, default=0.5)
    args = parser.parse_args(argv)

    from nnunetv2_lgms.nnunet_runner import nnunet_env
    work = args.work_dir.absolute()
    env = nnunet_env(work, "cpu")
    env["nnUNet_def_n_proc"] = "2"
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                           "nnUNet_extTrainer", "nnUNet_def_n_proc", "nnUNet_compile")})
    info = machine()
    rows = []
    for name in args.datasets:
        source = args.kvasir if name == "kvasir" else args.hippocampus
        raw = prepare_dataset(name, source, work, env)
        case_dir = prepare_case(name, raw, work)
        exports = prepare_models(name, work, env)
        ending = DATASETS[name]["ending"]
        for threads in args.threads:
            predictors = build_predictors(exports, threads, args.step_size)
            samples: Dict[tuple, List[float]] = {v: [] for v in VARIANTS}
            outputs = {v: work / "predictions" / name / f"{v[0]}_{v[1]}_t{threads}" for v in VARIANTS}
            for round_ in range(args.warmup + args.repeats):
                order = VARIANTS[round_ % len(VARIANTS):] + VARIANTS[:round_ % len(VARIANTS)]
                for variant in order:
                    seconds = predict_once(predictors[variant], variant[1], case_dir, ending, outputs[variant],
                                           threads)
                    if round_ >= args.warmup:
                        samples[variant].append(seconds)
                    log(f"{name} threads={threads} round {round_ + 1}: {variant[0]}/{variant[1]} {seconds:.3f} s")
            reference = statistics.median(samples["nnunet", "torch"])
            for network, runtime in VARIANTS:
                pred = next(outputs[network, runtime].glob(f"*{ending}"))
                torch_pred = outputs[network, "torch"] / pred.name
                rows.append({"dataset": name, "threads": threads, "network": network, "runtime": runtime,
                             "samples_s": samples[network, runtime],
                             "median_s": statistics.median(samples[network, runtime]),
                             "min_s": min(samples[network, runtime]),
                             "ratio_vs_nnunet_torch": statistics.median(samples[network, runtime]) / reference,
                             "agreement": None if runtime == "torch" else agreement(pred, torch_pred)})
    result = {"machine": info, "load_average_at_end": os.getloadavg(),
              "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deploy_cpu.json").write_text(json.dumps(result, indent=2))
    (args.out / "deploy_cpu.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
