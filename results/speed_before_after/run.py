"""Speed of the networks before and after their reference code and speed paths were separated, on one machine.

Both versions of the package run ``nnunetv2_lgms profile`` (forward at batch 1 and at the plan's batch, training
step, sliding window over one real preprocessed case with and without mirroring) in alternating processes, round
after round (before/after, then after/before, ...), so a drift of the machine falls on both. nnU-Net's own network
is profiled in every run as a control: its time should not change between the versions.

    python results/speed_before_after/run.py --before-tree /tmp/nnunetv2_lgms_before \\
        --cases 553:2d:nnUNetTrainer,nnUNetTrainerLGMSNet 4:3d_fullres --rounds 2 --threads 1 \\
        --out results/speed_before_after

``--before-tree``: a checkout of the earlier code (``git worktree add /tmp/nnunetv2_lgms_before <commit>``); the
current checkout is "after". nnU-Net's folders come from the environment.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
AFTER_TREE = HERE.parents[1]
METRICS = ("inference_bs1_s", "inference_s", "train_step_s", "sliding_window_s", "sliding_window_mirror_s")
TRAINERS = ("nnUNetTrainer", "nnUNetTrainerLGMSNet", "nnUNetTrainerGLIMS")


def profile(tree: Path, dataset: str, configuration: str, trainers, out: Path, repeats: int, threads: int,
            sliding_window_repeats: int = 1) -> list:
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}  # each tree puts its own shim there
    env["PYTHONPATH"] = str(tree)
    cmd = [sys.executable, "-m", "nnunetv2_lgms.cli", "profile", "-d", dataset, "-c", configuration,
           "-tr", *trainers, "--repeats", str(repeats), "--warmup", "1", "--no-memory", "--threads", str(threads),
           "--sliding-window-repeats", str(sliding_window_repeats),
           "--json", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-tree", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", default=["553:2d", "4:3d_fullres"],
                        help="DATASET:CONFIGURATION[:TRAINER,TRAINER...] (default: all three trainers)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sliding-window-repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    runs = []
    trainers_of = {}
    for case in args.cases:
        dataset, configuration, *named = case.split(":")
        trainers_of[case] = named[0].split(",") if named else list(TRAINERS)
        for r in range(args.rounds):
            for version in (("before", "after") if r % 2 == 0 else ("after", "before")):
                tree = args.before_tree if version == "before" else AFTER_TREE
                out = raw / f"{dataset}_{configuration}_{version}_{r}.json"
                rows = profile(tree, dataset, configuration, trainers_of[case], out, args.repeats, args.threads,
                               args.sliding_window_repeats)
                runs.append({"case": case, "round": r, "version": version, "rows": rows})
                print(f"{case} round {r} {version} done", file=sys.stderr, flush=True)
    lines = ["| case | trainer | metric | before (s) | after (s) | after / before | per round |", "|---|---|---|---:|---:|---:|---|"]
    summary = []
    for case in args.cases:
        for trainer in trainers_of[case]:
            for metric in METRICS:
                per_version = {}
                for version in ("before", "after"):
                    per_version[version] = [next(row[metric] for row in run["rows"] if row["trainer"] == trainer)
                                            for run in runs if run["case"] == case and run["version"] == version]
                before, after = (statistics.median(per_version[v]) for v in ("before", "after"))
                rounds = [a / b for a, b in zip(per_version["after"], per_version["before"])]
                summary.append({"case": case, "trainer": trainer, "metric": metric, "before_s": before,
                                "after_s": after, "ratio": after / before, "per_round": rounds})
                lines.append(f"| {case} | {trainer} | {metric} | {before:.3f} | {after:.3f} | {after / before:.2f} | "
                             f"{', '.join(f'{x:.2f}' for x in rounds)} |")
    meta = runs[0]["rows"][0]
    header = (f"{meta['device_name']}, {args.threads} threads, torch {meta['torch_version']}; {args.rounds} rounds "
              f"of alternating processes, each the median of {args.repeats} repetitions after 1 warm-up "
              f"(sliding window: of {args.sliding_window_repeats}); "
              f"after / before below 1 = faster after.\n\n")
    (args.out / "before_after.md").write_text(header + "\n".join(lines) + "\n")
    (args.out / "before_after.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    print(header + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
