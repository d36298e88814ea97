"""GLIMS's CPU training paths of the fifth CPU session, on against off in one process (interleaved steps): the 1x1
convs and heads as batched GEMMs on NC(D)HW maps (``ConvNormAct.gemm_pointwise``, ``GLIMSDecoder.gemm_heads``), the
InstanceNorms as GroupNorm in training (``LayoutKeepingInstanceNorm.group_norm_training``), the PReLUs after a
norm in place (``ScalarPReLU.inplace``) and the constant CSAB spatial gate without the conv it discards
(``CSAB.skip_constant_spatial_gate``). Every other speed path stays on in both. Training step as in the speed
report's probe (SGD, a mean over every deep-supervision output)::

    python results/speed_cpu/glims_training_ab.py [--presets hippocampus-3d 2d-256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from nnunetv2_lgms.benchmark.models import build_network, ensure_ext_trainer, find_trainer_class
from nnunetv2_lgms.benchmark.synthetic_plans import plan_preset
from nnunetv2_lgms.benchmark.tables import markdown_table
from nnunetv2_lgms.networks.blocks import ConvNormAct, LayoutKeepingInstanceNorm, ScalarPReLU
from nnunetv2_lgms.networks.glims import GLIMSDecoder
from nnunetv2_lgms.networks.glims_blocks import CSAB


def switch(net: torch.nn.Module, on: bool) -> None:
    for m in net.modules():
        if isinstance(m, ConvNormAct):
            m.gemm_pointwise = on
        if isinstance(m, GLIMSDecoder):
            m.gemm_heads = on
        if isinstance(m, LayoutKeepingInstanceNorm):
            m.group_norm_training = on
        if isinstance(m, CSAB):
            m.skip_constant_spatial_gate = on
        if isinstance(m, ScalarPReLU):
            m.inplace = on and m._built_in_place


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["hippocampus-3d", "2d-256"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    ensure_ext_trainer()
    rows = []
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            ctx = plan_preset(preset, Path(tmp))
            torch.manual_seed(0)
            net = build_network(find_trainer_class("nnUNetTrainerGLIMS"), ctx, deep_supervision=True).train()
            for m in net.modules():
                if isinstance(m, ScalarPReLU):
                    m._built_in_place = m.inplace
            opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
            x = torch.randn(ctx.batch_size, ctx.num_input_channels, *ctx.patch_size)

            def step() -> float:
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                sum(o.float().mean() for o in net(x)).backward()
                opt.step()
                return time.perf_counter() - t

            step()  # warm-up
            times = {"off": [], "on": []}
            for _ in range(args.repeats):
                for mode in ("off", "on"):
                    switch(net, mode == "on")
                    times[mode].append(step())
            off, on = statistics.median(times["off"]), statistics.median(times["on"])
            rows.append([preset, ctx.batch_size, " / ".join(f"{t:.2f}" for t in times["off"]),
                         " / ".join(f"{t:.2f}" for t in times["on"]), f"{off / on:.2f}x"])
            print(rows[-1], flush=True)
    print(f"\nGLIMS training step, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(markdown_table(["plan", "batch", "paths off: steps (s)", "paths on: steps (s)", "speed-up (medians)"],
                         rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
