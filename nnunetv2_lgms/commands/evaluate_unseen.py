"""``nnunetv2_lgms evaluate-unseen -d SOURCE -c CONFIG -tr TRAINER ... -f FOLDS --target TARGET ...``: a trained
model (one fold, or several as an ensemble) predicts converted unseen datasets with nnU-Net's predictor and is
scored with nnU-Net's metrics; prints a table shaped like the LGMSNet paper's Table 2."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="source dataset ID or name (the trained model's)")
    parser.add_argument("-c", "--configuration", required=True, help="e.g. 2d")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True, help="trained trainers to evaluate")
    parser.add_argument("-f", "--folds", nargs="+", default=["0"],
                        help="fold(s); several are ensembled as nnUNetv2_predict -f does (default: 0)")
    parser.add_argument("--target", nargs="+", required=True,
                        help="target dataset ID/name in nnUNet_raw, or a dataset folder (one column pair each)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: %(default)s)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth",
                        help="checkpoint file name (default: %(default)s)")
    parser.add_argument("--split", choices=["auto", "Tr", "Ts"], default="auto",
                        help="images/labels Tr or Ts of the target (default: Tr if present, else Ts)")
    parser.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--disable-tta", action="store_true", help="no test-time mirroring")
    parser.add_argument("-step_size", "--step-size", type=float, default=0.5, help="sliding-window step (0.5)")
    parser.add_argument("-np", "--num-processes", type=int, default=0,
                        help="worker processes for preprocessing/export/metrics (default 0: sequential)")
    parser.add_argument("-o", "--output", default=None,
                        help="output folder (default: ./nnunetv2_lgms_unseen/DatasetXXX_CONFIG)")


def run(args) -> int:
    import sys
    from pathlib import Path

    from nnunetv2_lgms.benchmark.models import BenchmarkError, dataset_name
    from nnunetv2_lgms.benchmark.unseen import evaluate_unseen, render_markdown

    try:
        source = dataset_name(args.dataset)
        out = Path(args.output or Path("nnunetv2_lgms_unseen") / f"{source}_{args.configuration}")
        result = evaluate_unseen(source, args.configuration, args.trainers, args.folds, args.target, out,
                                 device=args.device, plans_identifier=args.plans, checkpoint=args.checkpoint,
                                 split=args.split, step_size=args.step_size, mirroring=not args.disable_tta,
                                 num_processes=args.num_processes,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render_markdown(result))
    print(f"written: {out / 'unseen.md'}, {out / 'unseen.csv'}, {out / 'unseen.json'}; predictions and "
          f"summary.json under {out / 'predictions'}")
    return 0
