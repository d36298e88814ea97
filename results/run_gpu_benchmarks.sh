#!/usr/bin/env bash
# The commands behind results/speed_gpu and results/speed_gpu_compiled (one NVIDIA H200, AMP on; see
# results/speed_gpu/README.md). Usage: bash results/run_gpu_benchmarks.sh   (in an environment with this package
# installed and a CUDA GPU; writes into results/)
set -euo pipefail
RESULTS=$(realpath "$(dirname "$0")")
python -m nnunetv2_lgms.benchmark.speed_report --device cuda --presets 2d-256 hippocampus-3d --repeats 10 --warmup 3 \
  --out "$RESULTS/speed_gpu"
# compiled: batch-1 forward only (the compiled training step did not fit the session's 15 minutes of GPU time)
python -m nnunetv2_lgms.benchmark.speed_report --device cuda --compile --batch-1-only --presets 2d-256 hippocampus-3d \
  -tr nnUNetTrainer nnUNetTrainerLGMSNet --repeats 10 --warmup 3 --out "$RESULTS/speed_gpu_compiled"
