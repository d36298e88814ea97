"""``nnunetv2_lgms profile -d ID -c CONFIG -tr TRAINER [TRAINER ...]``: parameters, FLOPs, forward/training-step
time, peak memory and sliding-window time of trainers' networks on one nnU-Net plan, measured interleaved
(round-robin over trainers in every repetition), with ratios against the first trainer."""
from __future__ import annotations

from nnunetv2_lgms.benchmark.models import add_cuda_graphs_argument


def add_arguments(parser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset ID or name (as for nnUNetv2_train)")
    parser.add_argument("-c", "--configuration", required=True, help="e.g. 2d, 3d_fullres")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True,
                        help="trainers to compare, the first is the reference for the ratios")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: %(default)s)")
    parser.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5, help="measured repetitions, median reported (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded repetitions first (default: 1)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the networks first, as nnU-Net does when training on CUDA")
    add_cuda_graphs_argument(parser)
    parser.add_argument("--no-sliding-window", action="store_true", help="skip the sliding-window timing")
    parser.add_argument("--sliding-window-repeats", type=int, default=1,
                        help="repetitions of the sliding-window timing (default: 1)")
    parser.add_argument("--case", default=None,
                        help="preprocessed case for the sliding window (default: the first identifier)")
    parser.add_argument("--step-size", type=float, default=0.5, help="sliding-window tile step (default: 0.5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as a JSON list")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="also write the table to FILE")


def run(args) -> int:
    import json
    import sys
    from pathlib import Path

    import torch

    from nnunetv2_lgms.benchmark.models import BenchmarkError, ensure_ext_trainer, load_plan_context
    from nnunetv2_lgms.benchmark.profiling import ProfileSettings, profile_trainers, render_markdown

    if args.repeats < 1 or args.warmup < 0 or args.sliding_window_repeats < 1:
        print("--repeats and --sliding-window-repeats must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_ext_trainer()
    settings = ProfileSettings(device=args.device, repeats=args.repeats, warmup=args.warmup,
                               sliding_window=not args.no_sliding_window,
                               sliding_window_repeats=args.sliding_window_repeats, step_size=args.step_size,
                               case=args.case, memory=not args.no_memory, compile=args.compile,
                               cuda_graphs=args.cuda_graphs)
    try:
        ctx = load_plan_context(args.dataset, args.configuration, args.plans)
        rows = profile_trainers(ctx, args.trainers, settings, log=lambda m: print(m, file=sys.stderr, flush=True))
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = render_markdown(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"written: {args.json}")
    return 0
