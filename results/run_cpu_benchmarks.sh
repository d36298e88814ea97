#!/usr/bin/env bash
# The commands behind results/kvasir_2d, results/hippocampus_3d, results/zero_shot_kvasir_to_cvc and
# results/speed_cpu (2 CPU cores, no GPU). Usage: bash results/run_cpu_benchmarks.sh WORK_DIR [SHARED_DATA_DIR]
# WORK_DIR gets nnUNet_raw/preprocessed/results; SHARED_DATA_DIR defaults to ../shared/data.
set -euo pipefail
WORK=$(realpath "${1:?usage: run_cpu_benchmarks.sh WORK_DIR [SHARED_DATA_DIR]}")
DATA=$(realpath "${2:-$(dirname "$0")/../../shared/data}")
RESULTS=$(realpath "$(dirname "$0")")
export nnUNet_raw=$WORK/raw nnUNet_preprocessed=$WORK/pre nnUNet_results=$WORK/res
export nnUNet_def_n_proc=2 nnUNet_compile=f
eval "$(nnunetv2_lgms env)"

# 1. data: Kvasir-SEG and CVC-ClinicDB resized to 128x128 (the CPU protocol), MSD Hippocampus as released
nnunetv2_lgms convert kvasir "$DATA/Kvasir-SEG" --resize 128 --id 601 --no-progress -np 2
nnunetv2_lgms convert cvc-clinicdb "$DATA/CVC-ClinicDB" --resize 128 --id 602 --no-progress -np 2
# nnUNetv2_convert_MSD_dataset insists on an imagesTs folder, which the shared copy lacks: give it an empty one
mkdir -p "$WORK/msd/Task04_Hippocampus/imagesTs"
for f in imagesTr labelsTr dataset.json; do ln -sfn "$DATA/Task04_Hippocampus/$f" "$WORK/msd/Task04_Hippocampus/$f"; done
nnUNetv2_convert_MSD_dataset -i "$WORK/msd/Task04_Hippocampus" -overwrite_id 604 -np 2
nnUNetv2_plan_and_preprocess -d 601 -c 2d -np 2 --verify_dataset_integrity
nnUNetv2_plan_and_preprocess -d 604 -c 3d_fullres -np 2 --verify_dataset_integrity

# 2. training, fold 0, the same reduced budget for every trainer (see nnunetv2_lgms/trainers/budget.py):
#    2d: 10 epochs x 20 iterations at batch 8; 3d: 10 epochs x 12 iterations at batch 2
mkdir -p "$WORK/logs"
for tr in Baseline LGMSNet GLIMS; do
  /usr/bin/time -f "%e s" -o "$WORK/logs/time_601_$tr.txt" \
    env nnUNet_n_proc_DA=0 nnUNetv2_train 601 2d 0 -tr nnUNetTrainer${tr}_cpubench -device cpu > "$WORK/logs/train_601_$tr.log"
done
for tr in Baseline LGMSNet GLIMS; do
  /usr/bin/time -f "%e s" -o "$WORK/logs/time_604_$tr.txt" \
    env nnUNet_n_proc_DA=0 nnUNetv2_train 604 3d_fullres 0 -tr nnUNetTrainer${tr}_cpubench3d -device cpu > "$WORK/logs/train_604_$tr.log"
done

# 3. cross-validation tables (fold 0 only: the other folds are listed as missing)
nnunetv2_lgms compare -d 601 -c 2d -tr nnUNetTrainerBaseline_cpubench nnUNetTrainerLGMSNet_cpubench \
  nnUNetTrainerGLIMS_cpubench -o "$RESULTS/kvasir_2d"
nnunetv2_lgms compare -d 604 -c 3d_fullres -tr nnUNetTrainerBaseline_cpubench3d nnUNetTrainerLGMSNet_cpubench3d \
  nnUNetTrainerGLIMS_cpubench3d -o "$RESULTS/hippocampus_3d"

# 4. zero-shot Kvasir -> CVC-ClinicDB (612 frames), fold-0 models, no test-time mirroring
nnunetv2_lgms evaluate-unseen -d 601 -c 2d -tr nnUNetTrainerBaseline_cpubench nnUNetTrainerLGMSNet_cpubench \
  nnUNetTrainerGLIMS_cpubench -f 0 --target 602 --disable-tta -np 2 -o "$WORK/unseen"
mkdir -p "$RESULTS/zero_shot_kvasir_to_cvc" && cp "$WORK/unseen/unseen.md" "$RESULTS/zero_shot_kvasir_to_cvc/"

# 5. profiles on the real plans (the plan's batch; one preprocessed case for the sliding window)
nnunetv2_lgms profile -d 601 -c 2d -tr nnUNetTrainer nnUNetTrainerLGMSNet nnUNetTrainerGLIMS --repeats 1 \
  --markdown "$RESULTS/kvasir_2d/profile.md" --json "$RESULTS/kvasir_2d/profile.json"
nnunetv2_lgms profile -d 604 -c 3d_fullres -tr nnUNetTrainer nnUNetTrainerLGMSNet nnUNetTrainerGLIMS --repeats 1 \
  --markdown "$RESULTS/hippocampus_3d/profile.md" --json "$RESULTS/hippocampus_3d/profile.json"

# 6. speed report (issue 6) on nnU-Net's plans for a 256x256 2D dataset and for Hippocampus; and the BTCV-sized plan
python -m nnunetv2_lgms.benchmark.speed_report --out "$RESULTS/speed_cpu"
# results/speed_cpu/speed_paths.md and op_profile.md collect these tables (with the date and commit of each run)
python -m nnunetv2_lgms.benchmark.speed_paths | tee "$WORK/logs/speed_paths.md"
python -m nnunetv2_lgms.benchmark.speed_paths --presets hippocampus-3d -tr nnUNetTrainerGLIMS | tee -a "$WORK/logs/speed_paths.md"
for tr in nnUNetTrainerLGMSNet nnUNetTrainer; do
  python "$RESULTS/speed_cpu/op_profile.py" --trainer $tr
done | tee "$WORK/logs/op_profile.md"
# the BTCV-sized plan: batch-1 forward only. Its training step (112x160x128, batch 2: 5.7x the voxels of the
# Hippocampus batch, where GLIMS needed 12.8 GB of tensor memory) was not attempted on this 24 GB machine.
python -m nnunetv2_lgms.benchmark.speed_report --presets abdomen-ct-3d --batch-1-only --repeats 1 \
  --out "$RESULTS/speed_cpu_abdomen_ct"
