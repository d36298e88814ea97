"""The probe behind layout_and_graphs.log (see README.md here): eval forward with AMP on the 2D 256 and Hippocampus
plans, nnU-Net's network and LGMSNet, NCHW or channels-last input, eager or replayed from CUDA graphs
(GraphedModule). Medians of 30 after 5 warm-ups. Usage: python layout_and_graphs.py [PRESET ...]"""
import statistics, sys, tempfile, time
from pathlib import Path
import torch
from nnunetv2_lgms.benchmark.models import build_network, ensure_ext_trainer, find_trainer_class
from nnunetv2_lgms.benchmark.synthetic_plans import plan_preset
from nnunetv2_lgms.networks.cuda_graphs import GraphedModule, GraphedInference

ensure_ext_trainer()
torch.backends.cudnn.benchmark = True
dev = torch.device("cuda")

def bench(net, x, n=30, warm=5):
    ts = []
    with torch.inference_mode(), torch.autocast("cuda"):
        for i in range(warm + n):
            torch.cuda.synchronize(); t = time.perf_counter(); net(x); torch.cuda.synchronize()
            if i >= warm: ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3

with tempfile.TemporaryDirectory() as tmp:
    for preset in sys.argv[1:] or ["2d-256", "hippocampus-3d"]:
        ctx = plan_preset(preset, Path(tmp))
        res = {}
        for tr in ("nnUNetTrainer", "nnUNetTrainerLGMSNet"):
            torch.manual_seed(0)
            base = build_network(find_trainer_class(tr), ctx, False).to(dev).eval()
            if isinstance(base, GraphedInference):
                base.cuda_graph_inference = False
            graphed = GraphedModule(base).eval()
            for b in (1, ctx.batch_size):
                x = torch.randn(b, ctx.num_input_channels, *ctx.patch_size, device=dev)
                for fmt in ("ncx", "cl"):
                    xx = x if fmt == "ncx" else x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
                    if fmt == "cl":
                        base.to(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
                    for mode, net in (("eager", base), ("graph", graphed)):
                        res[(tr, b, fmt, mode)] = bench(net, xx)
                    if fmt == "cl":
                        base.to(memory_format=torch.contiguous_format)
                        graphed.__dict__.pop("_cuda_graphs", None)
        print(f"## {preset} (ms, median of 30; ratio = nnU-Net eager NCHW same batch / this)")
        for k, v in res.items():
            ref = res[("nnUNetTrainer", k[1], "ncx", "eager")]
            refg = res[("nnUNetTrainer", k[1], k[2], k[3])]
            print(f"{k[0]:24s} bs{k[1]:<3d} {k[2]:4s} {k[3]:6s} {v:8.2f} ms   speed-up vs nnU-Net eager NCHW {ref / v:5.2f}x   vs nnU-Net same mode {refg / v:5.2f}x", flush=True)
