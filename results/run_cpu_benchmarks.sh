#!/usr/bin/env bash
# The commands behind results/speed_cpu and results/speed_cpu_abdomen_ct (CPU only; no data needed: the plans come
# from hand-written dataset fingerprints). Usage: bash results/run_cpu_benchmarks.sh
set -euo pipefail
RESULTS=$(realpath "$(dirname "$0")")
export nnUNet_compile=f

# speed report on nnU-Net's plans for a 256x256 2D dataset and for Hippocampus
python -m nnunetv2_lgms.benchmark.speed_report --out "$RESULTS/speed_cpu"
# the BTCV-sized plan (112x160x128): batch-1 forward only
python -m nnunetv2_lgms.benchmark.speed_report --presets abdomen-ct-3d --batch-1-only --repeats 1 \
  --out "$RESULTS/speed_cpu_abdomen_ct"
