#!/usr/bin/env bash
# The commands behind the GPU results (AMP on). Usage: bash results/run_gpu_benchmarks.sh [h100|h200]
# (in an environment with this package installed and a CUDA GPU; writes into results/).
#   h100 (default): results/speed_gpu_h100, CUDA-graph inference as shipped / off / for every network, the
#                   sliding-window prediction and the kernel profile (see results/speed_gpu_h100/README.md)
#   h200:           results/speed_gpu (every network eager) and results/speed_gpu_compiled (torch.compile)
set -euo pipefail
RESULTS=$(realpath "$(dirname "$0")")
REPORT="python -m nnunetv2_lgms.benchmark.speed_report --device cuda --presets 2d-256 hippocampus-3d --repeats 10 --warmup 3"
case "${1:-h100}" in
  h100)
    H=$RESULTS/speed_gpu_h100
    python -m pytest -q tests/test_cuda_graphs.py | tee "$H/device.log"
    $REPORT --cuda-graphs default -tr nnUNetTrainer nnUNetTrainerLGMSNet nnUNetTrainerGLIMS --out "$H/as_shipped"
    $REPORT --cuda-graphs off -tr nnUNetTrainer nnUNetTrainerLGMSNet nnUNetTrainerGLIMS --out "$H/graphs_off"
    $REPORT --cuda-graphs all -tr nnUNetTrainer nnUNetTrainerLGMSNet --out "$H/graphs_all"
    python "$H/layout_and_graphs.py" 2d-256 hippocampus-3d | tee "$H/layout_and_graphs.log"
    python "$H/sliding_window.py" cuda | tee "$H/sliding_window.log"
    python "$H/kernel_profile.py" cuda | tee "$H/kernel_profile.log"
    ;;
  h200)
    $REPORT -tr nnUNetTrainer nnUNetTrainerLGMSNet nnUNetTrainerGLIMS --cuda-graphs off --out "$RESULTS/speed_gpu"
    # compiled: batch-1 forward only (the compiled training step was not measured)
    python -m nnunetv2_lgms.benchmark.speed_report --device cuda --compile --batch-1-only --presets 2d-256 \
      hippocampus-3d -tr nnUNetTrainer nnUNetTrainerLGMSNet --repeats 10 --warmup 3 --out "$RESULTS/speed_gpu_compiled"
    ;;
  *) echo "usage: $0 [h100|h200]" >&2; exit 2 ;;
esac
