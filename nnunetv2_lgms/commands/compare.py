"""``nnunetv2_lgms compare -d ID -c CONFIG -tr TRAINER ...``: cross-validation table (Markdown + CSV) of trainers
from nnU-Net's per-fold ``validation/summary.json``: Dice/IoU per label or region and the foreground mean, mean ±
std over folds (missing folds listed), a paired per-case Wilcoxon test against the first trainer and a boxplot."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    parser.add_argument("-c", "--configuration", required=True, help="e.g. 2d, 3d_fullres")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True,
                        help="trainers to compare, the first is the reference of the paired tests")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: %(default)s)")
    parser.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                        help="folds to aggregate (default: 0 1 2 3 4)")
    parser.add_argument("-o", "--output", default=None,
                        help="output folder (default: ./nnunetv2_lgms_compare/DatasetXXX_CONFIG)")


def run(args) -> int:
    import sys
    from pathlib import Path

    from nnunetv2_lgms.benchmark.comparison import compare, render_markdown, write_outputs
    from nnunetv2_lgms.benchmark.models import BenchmarkError, dataset_name

    try:
        dataset = dataset_name(args.dataset)
        result = compare(dataset, args.configuration, args.trainers, args.plans, args.folds)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.output or Path("nnunetv2_lgms_compare") / f"{dataset}_{args.configuration}")
    paths = write_outputs(result, out)
    print(render_markdown(result))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
