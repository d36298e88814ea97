"""Speed report: how close each network comes to the speed its FLOPs promise, against nnU-Net's own network.

One command profiles the trainers on nnU-Net plans for typical datasets (:mod:`synthetic_plans`; no images needed),
interleaved as ``nnunetv2_lgms profile`` does, and writes ``speed_report.md`` (tables), ``speed_report.json`` (all
rows) and ``speed_report.png`` (time ratio against FLOP ratio; on the diagonal a network is exactly as fast as its
FLOPs promise, below it faster)::

    python -m nnunetv2_lgms.benchmark.speed_report --out results/speed_cpu
    python -m nnunetv2_lgms.benchmark.speed_report --device cuda --out results/speed_gpu            # AMP on
    python -m nnunetv2_lgms.benchmark.speed_report --device cuda --compile --out results/speed_gpu_compiled
    python -m nnunetv2_lgms.benchmark.speed_report --device cuda --cuda-graphs all --out DIR  # nnU-Net's too
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

DEFAULT_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerLGMSNet", "nnUNetTrainerGLIMS")
DEFAULT_PRESETS = ("2d-256", "hippocampus-3d")


def time_vs_flops(rows: List[dict]) -> List[dict]:
    """Per non-reference row: FLOP ratio and time ratios against the first row (the reference network), the latter
    as the ratio of the medians and, under ``<name>_range``, the lowest and highest ratio within one repetition (the
    networks are timed seconds apart there, so slow drifts of the machine cancel; the spread shows the rest of its
    noise)."""
    ref = rows[0]
    out = []
    for r in rows[1:]:
        entry = {"trainer": r["trainer"], "flop_ratio": r["gflops"] / ref["gflops"]}
        for key, name in (("inference_s", "inference_time_ratio"), ("train_step_s", "train_step_time_ratio"),
                          ("inference_bs1_s", "inference_bs1_time_ratio")):
            if r.get(key) and ref.get(key):
                entry[name] = r[key] / ref[key]
                own, other = (row.get("samples", {}).get(key) for row in (r, ref))
                if own and other and len(own) == len(other):
                    pairs = [a / b for a, b in zip(own, other)]
                    entry[f"{name}_range"] = (min(pairs), max(pairs))
        out.append(entry)
    return out


def render_report(sections: List[dict], command: str) -> str:
    from nnunetv2_lgms.benchmark.profiling import render_markdown
    from nnunetv2_lgms.benchmark.tables import markdown_table

    lines = ["# Speed report", "", f"Command: `{command}`", "",
             "Time ratio = network's time / nnU-Net network's time on the same plan, measured interleaved in one "
             "run (in brackets: as a speed factor, and the lowest and highest factor within one repetition, which "
             "times the networks seconds apart). FLOP ratio = the same for forward FLOPs. A time ratio at the FLOP "
             "ratio means the network is as fast as its FLOPs promise; above it, slower.", ""]
    summary = []
    for sec in sections:
        for e in time_vs_flops(sec["rows"]):
            summary.append([sec["preset"], e["trainer"], f"{e['flop_ratio']:.2f}",
                            *(_fmt_ratio(e.get(name), e.get(f"{name}_range")) for name in (
                                "inference_bs1_time_ratio", "inference_time_ratio", "train_step_time_ratio"))])
    lines += [markdown_table(["plan", "trainer", "FLOP ratio", "inference time ratio (batch 1)",
                              "inference time ratio (plan's batch)", "train step time ratio"], summary), ""]
    for sec in sections:
        lines += [f"## {sec['preset']}: {sec['description']}", "", render_markdown(sec["rows"]), ""]
    return "\n".join(lines)


def _fmt_ratio(v: Optional[float], per_repetition: Optional[Sequence[float]] = None) -> str:
    """``0.45 (2.22x faster; 2.05–2.31x per repetition)``: the ratio, as a speed factor, and its per-repetition
    range as factors of the same direction."""
    if v is None:
        return "–"
    faster = v < 1
    factor = (lambda r: 1 / r) if faster else (lambda r: r)
    spread = ""
    if per_repetition and len(per_repetition) == 2 and per_repetition[0] != per_repetition[1]:
        low, high = sorted(factor(r) for r in per_repetition)
        spread = f"; {low:.2f}–{high:.2f}x per repetition"
    return f"{v:.2f} ({factor(v):.2f}x {'faster' if faster else 'slower'}{spread})"


def plot(sections: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    markers = "osD^v"
    for ax, key, title in zip(axes, ("inference_time_ratio", "train_step_time_ratio"),
                              ("inference (forward at the plan's batch)", "training step")):
        ax.plot([0.05, 20], [0.05, 20], color="grey", ls="--", lw=1, label="as fast as FLOPs promise")
        ax.axhline(1, color="black", lw=0.6)
        ax.axvline(1, color="black", lw=0.6)
        for i, sec in enumerate(sections):
            for j, e in enumerate(time_vs_flops(sec["rows"])):
                if key in e:
                    ax.scatter(e["flop_ratio"], e[key], marker=markers[i % len(markers)], color=f"C{j}", s=50,
                               label=f"{e['trainer'].replace('nnUNetTrainer', '')} · {sec['preset']}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(0.1, 10)
        ax.set_ylim(0.1, 10)
        ax.set_aspect("equal")
        ax.set_xlabel("FLOP ratio vs nnU-Net's network")
        ax.set_ylabel("time ratio vs nnU-Net's network")
        ax.set_title(title)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sections: List[dict], command: str, out: Path, seconds: float) -> str:
    """Write speed_report.md/.json/.png for the plans measured so far; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    report = render_report(sections, command) + f"\nWall time of the report: {seconds:.0f} s.\n"
    (out / "speed_report.md").write_text(report)
    (out / "speed_report.json").write_text(json.dumps(sections, indent=2))
    plot(sections, out / "speed_report.png")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_lgms.benchmark.speed_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from nnunetv2_lgms.benchmark.models import add_cuda_graphs_argument
    from nnunetv2_lgms.benchmark.synthetic_plans import PRESETS
    parser.add_argument("--out", required=True, help="folder for speed_report.md/.json/.png")
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), choices=list(PRESETS))
    parser.add_argument("-tr", "--trainers", nargs="+", default=list(DEFAULT_TRAINERS),
                        help="the first is the reference (default: %(default)s)")
    parser.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    add_cuda_graphs_argument(parser)
    parser.add_argument("--batch-1-only", action="store_true",
                        help="time only the batch-1 forward (plans whose training step does not fit in memory)")
    args = parser.parse_args(argv)

    import torch

    from nnunetv2_lgms.benchmark.models import BenchmarkError, ensure_ext_trainer
    from nnunetv2_lgms.benchmark.profiling import ProfileSettings, profile_trainers
    from nnunetv2_lgms.benchmark.synthetic_plans import describe, plan_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_ext_trainer()
    settings = ProfileSettings(device=args.device, repeats=args.repeats, warmup=args.warmup, sliding_window=False,
                               memory=args.device == "cuda", compile=args.compile, batch=not args.batch_1_only,
                               cuda_graphs=args.cuda_graphs)
    command = "python -m nnunetv2_lgms.benchmark.speed_report " + " ".join(argv if argv is not None else sys.argv[1:])
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    out = Path(args.out)
    sections = []
    t0 = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="nnunetv2_lgms_speed_") as tmp:
            for key in args.presets:
                ctx = plan_preset(key, Path(tmp))
                log(f"[{key}] {PRESETS[key].description}; nnU-Net plan: {describe(ctx)}")
                rows = profile_trainers(ctx, args.trainers, settings, log=log)
                sections.append({"preset": key, "description": f"{PRESETS[key].description}; nnU-Net plan "
                                                                f"{describe(ctx)}", "rows": rows})
                # after every plan, so a run stopped early (a time limit on a lent GPU) keeps the finished ones
                report = write_report(sections, command, out, time.time() - t0)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report)
    print(f"written: {out / 'speed_report.md'}, speed_report.json, speed_report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
