"""``nnunetv2_lgms predict -i IN -o OUT -m DIR [--backend onnxruntime|openvino|torch]``: nnU-Net's prediction
(preprocessing, Gaussian sliding window, mirroring, fold ensemble, resampling, export) with the network run by a
CPU runtime from an ``nnunetv2_lgms export`` folder; ``--backend torch`` runs the folder's checkpoints in PyTorch."""
from __future__ import annotations


def add_arguments(parser) -> None:
    from nnunetv2_lgms.deploy.manifest import BACKEND_CHOICES

    parser.add_argument("-i", "--input", required=True, help="folder of images named CASE_XXXX.ending, as for "
                                                            "nnUNetv2_predict")
    parser.add_argument("-o", "--output", required=True, help="output folder (created; same-named files replaced)")
    parser.add_argument("-m", "--model", required=True, help="folder written by nnunetv2_lgms export")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                        help="runtime (default: onnxruntime for an ONNX export, openvino for an OpenVINO one)")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="folds to ensemble (default: every exported fold)")
    parser.add_argument("--disable_tta", action="store_true", help="no test-time mirroring (faster, less accurate)")
    parser.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (default: %(default)s)")
    parser.add_argument("-npp", type=int, default=3,
                        help="preprocessing processes (default: %(default)s; 0 here or in -nps: no worker "
                             "processes, nnU-Net's sequential prediction)")
    parser.add_argument("-nps", type=int, default=3,
                        help="segmentation export processes (default: %(default)s; 0: see -npp)")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads of the runtime (default: the runtime's own choice)")
    parser.add_argument("--save_probabilities", action="store_true", help="also write .npz probabilities")
    parser.add_argument("-prev_stage_predictions", default=None,
                        help="the previous stage's predictions, for a cascade's full-resolution stage")
    parser.add_argument("--disable_progress_bar", action="store_true", help="no progress bar")


def run(args) -> int:
    import sys

    from nnunetv2_lgms.benchmark.models import BenchmarkError
    from nnunetv2_lgms.deploy.engines import RuntimeUnavailable
    from nnunetv2_lgms.deploy.predictor import predict_folder

    try:
        out = predict_folder(args.input, args.output, args.model, backend=args.backend, folds=args.folds,
                             use_mirroring=not args.disable_tta, step_size=args.step_size,
                             num_processes_preprocessing=args.npp, num_processes_export=args.nps,
                             threads=args.threads, save_probabilities=args.save_probabilities,
                             prev_stage_predictions=args.prev_stage_predictions,
                             allow_tqdm=not args.disable_progress_bar,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    except (BenchmarkError, RuntimeUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"written: {out}")
    return 0
