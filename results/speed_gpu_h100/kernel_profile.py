"""The profile behind kernel_profile.log (see README.md here): which CUDA kernels LGMSNet's eager eval forward
spends its time in (AMP, batch 1, Hippocampus and 2D plans), and 3D depthwise-conv variants at the Hippocampus
plan's level 0. Usage: python kernel_profile.py [cuda|cpu]"""
import sys, tempfile, time, statistics
from pathlib import Path
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from nnunetv2_lgms.benchmark.models import build_network, ensure_ext_trainer, find_trainer_class
from nnunetv2_lgms.benchmark.synthetic_plans import plan_preset

ensure_ext_trainer()
dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
cuda = dev.type == "cuda"
torch.backends.cudnn.benchmark = True
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
sort = "cuda_time_total" if cuda else "cpu_time_total"

def sync():
    if cuda:
        torch.cuda.synchronize()

with tempfile.TemporaryDirectory() as tmp:
    for preset in ("hippocampus-3d", "2d-256"):
        ctx = plan_preset(preset, Path(tmp))
        net = build_network(find_trainer_class("nnUNetTrainerLGMSNet"), ctx, False).to(dev).eval()
        net.cuda_graph_inference = False
        x = torch.randn(1, ctx.num_input_channels, *ctx.patch_size, device=dev)
        with torch.inference_mode(), torch.autocast(dev.type, enabled=cuda):
            for _ in range(3):
                net(x)
            sync()
            with profile(activities=acts) as prof:
                for _ in range(5):
                    net(x)
                sync()
        print(f"## {preset} LGMSNet eval forward bs1, 5 calls")
        print(prof.key_averages().table(sort_by=sort, row_limit=22, max_name_column_width=70))
    # 3D depthwise convs at level 0 of the Hippocampus plan: 4 channels per kernel group, 40x56x40, batch 1
    def t(fn, n=20):
        for _ in range(3):
            fn()
        sync()
        ts = []
        for _ in range(n):
            s = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - s)
        return statistics.median(ts) * 1e3
    print("## depthwise 3D, batch 1, 40x56x40 (ms, median of 20, per call incl. launch)")
    for c in ((4, 16) if cuda else (4,)):
        for k in ((3, 5, 7, 9) if cuda else (9,)):
            for dt in ((torch.float16, torch.float32) if cuda else (torch.float32,)):
                for fmt in ("ncdhw", "ndhwc"):
                    xx = torch.randn(1, c, 40, 56, 40, device=dev, dtype=dt)
                    w = torch.randn(c, 1, k, k, k, device=dev, dtype=dt)
                    if fmt == "ndhwc":
                        xx = xx.contiguous(memory_format=torch.channels_last_3d)
                        w = w.contiguous(memory_format=torch.channels_last_3d)
                    with torch.inference_mode():
                        ms = t(lambda: F.conv3d(xx, w, padding=k // 2, groups=c))
                    print(f"C={c:2d} k={k} {str(dt):14s} {fmt}: {ms:7.3f} ms", flush=True)
