"""``nnunetv2_lgms export -d ID -c CONFIG -tr TRAINER -f FOLDS -o DIR --format onnx|openvino``: trained folds as
ONNX or OpenVINO models for CPU inference, each checked against PyTorch, with everything ``nnunetv2_lgms predict``
needs (plans, dataset.json, the folds' weights, a manifest) in one folder."""
from __future__ import annotations


def add_arguments(parser) -> None:
    from nnunetv2_lgms.deploy.manifest import DEFAULT_TOLERANCE, FORMATS

    parser.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    parser.add_argument("-c", "--configuration", required=True, help="e.g. 2d, 3d_fullres")
    parser.add_argument("-tr", "--trainer", required=True, help="trainer whose results folder to export")
    parser.add_argument("-f", "--folds", nargs="+", required=True, help="folds to export (0 1 2 3 4, or all)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: %(default)s)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth",
                        help="checkpoint file name (default: %(default)s)")
    parser.add_argument("-o", "--output", required=True, help="export folder to create")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx (runs on ONNX Runtime and OpenVINO) or openvino (OpenVINO IR)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty -o")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest accepted |logit difference| to PyTorch, relative to the largest |logit| "
                             "(at least 1) (default: %(default)g)")


def run(args) -> int:
    import sys

    from nnunetv2_lgms.benchmark.models import BenchmarkError
    from nnunetv2_lgms.deploy.engines import RuntimeUnavailable
    from nnunetv2_lgms.deploy.export import export_folds

    try:
        out = export_folds(args.dataset, args.configuration, args.trainer, args.folds, args.output, args.format,
                           plans_identifier=args.plans, checkpoint_name=args.checkpoint, overwrite=args.overwrite,
                           tolerance=args.tolerance, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (BenchmarkError, RuntimeUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"written: {out}; predict with nnunetv2_lgms predict -i IMAGES -o OUTPUT -m {out}")
    return 0
