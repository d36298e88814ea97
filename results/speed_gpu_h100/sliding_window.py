"""The timing behind sliding_window.log (see README.md here): nnUNetPredictor.predict_sliding_window_return_logits,
what nnUNetv2_predict runs per case (Gaussian-weighted tiles at step 0.5, batch-1 forwards, test-time mirroring
on, AMP), on a random case; nnU-Net's network and LGMSNet, each with and without CUDA graphs. Interleaved, medians.
Usage: python sliding_window.py [cuda|cpu [PRESET C D H W]]"""
import statistics, sys, tempfile, time
from pathlib import Path
import torch
from nnunetv2_lgms.benchmark.models import ensure_ext_trainer
from nnunetv2_lgms.benchmark.profiling import _Subject, _predictor, _n_tiles
from nnunetv2_lgms.benchmark.synthetic_plans import plan_preset

ensure_ext_trainer()
dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
reps, warm = (5, 2) if dev.type == "cuda" else (1, 1)
if dev.type == "cuda":
    torch.backends.cudnn.benchmark = True
cases = {"2d-256": (3, 1, 512, 512), "hippocampus-3d": (1, 80, 112, 80)}
if len(sys.argv) > 2:
    cases = {sys.argv[2]: tuple(int(v) for v in sys.argv[3:])}
with tempfile.TemporaryDirectory() as tmp:
    for preset, shape in cases.items():
        ctx = plan_preset(preset, Path(tmp))
        subjects = [(label, _Subject(tr, ctx, dev, cuda_graphs=mode)) for label, tr, mode in (
            ("nnU-Net's network, eager (stock)", "nnUNetTrainer", "default"),
            ("nnU-Net's network, CUDA graphs", "nnUNetTrainer", "all"),
            ("LGMSNet, CUDA graphs (as shipped)", "nnUNetTrainerLGMSNet", "default"),
            ("LGMSNet, eager", "nnUNetTrainerLGMSNet", "off"))]
        data = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        preds = {label: _predictor(s, ctx, dev, True, 0.5) for label, s in subjects}
        times = {label: [] for label, _ in subjects}
        for rep in range(warm + reps):
            order = subjects[rep % 4:] + subjects[:rep % 4]
            for label, _s in order:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                preds[label].predict_sliding_window_return_logits(data)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if rep >= warm:
                    times[label].append(time.perf_counter() - t)
        n = _n_tiles(next(iter(preds.values())), data)
        ref = statistics.median(times[subjects[0][0]])
        print(f"## {preset}: case {shape}, {n} tiles, mirroring on; median of {reps} after {warm} warm-up")
        for label, ts in times.items():
            m = statistics.median(ts)
            print(f"{label:36s} {m * 1e3:9.1f} ms  ({ref / m:.2f}x the stock nnU-Net network's speed)  "
                  f"samples {[round(t * 1e3, 1) for t in ts]}", flush=True)
