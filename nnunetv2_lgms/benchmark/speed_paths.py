"""What the CPU speed paths of LGMSNet (default) and GLIMS gain: the same network with every speed switch on
(default) and off, timed interleaved on the plans of the speed report (forward at the plan's batch in eval mode,
training step with SGD). The math is the same either way (``tests/test_speed_paths.py``)::

    python -m nnunetv2_lgms.benchmark.speed_paths [--presets 2d-256 hippocampus-3d] [-tr nnUNetTrainerLGMSNet
        nnUNetTrainerGLIMS] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from nnunetv2_lgms.benchmark.tables import markdown_table
from nnunetv2_lgms.networks.blocks import ConvNormAct, LayoutKeepingInstanceNorm, ScalarPReLU
from nnunetv2_lgms.networks.glims import GLIMSDecoder
from nnunetv2_lgms.networks.glims_blocks import CSAB, DACB, StridedConvINPReLU
from nnunetv2_lgms.networks.lgms_blocks import FusionConv, LocalMultiscaleBlock, UpConv
from nnunetv2_lgms.networks.lgmsnet import LGMSNet
from nnunetv2_lgms.networks.sparse_attention import MultiHeadSelfAttention, SparseTransformerLayer


def disable_speed_paths(net: nn.Module) -> nn.Module:
    """Switch every speed path of the module tree off (in place): the plain reference computation."""
    for m in net.modules():
        if isinstance(m, (ConvNormAct, FusionConv)):
            m.fold_batch_norm = False
        if isinstance(m, ConvNormAct):
            m.fuse_activation = False
            m.norm_in_place = False
            m.gemm_pointwise = False
            m.gemm_weight_grad = False
        if isinstance(m, GLIMSDecoder):
            m.gemm_heads = False
        if isinstance(m, FusionConv):
            m.blockwise_pointwise = False
            m.blockwise_training = False
        if isinstance(m, LocalMultiscaleBlock):
            m.channels_last_depthwise = False
            m.in_place_inference = False
            m.in_place_training_sums = False
            m.merged_depthwise = False
            m.fast_depthwise_backward = False
        if isinstance(m, UpConv):
            m.subpixel_inference = False
        if isinstance(m, LGMSNet):
            m.cpu_channels_last = False
        if isinstance(m, MultiHeadSelfAttention):
            m.pad_head_dim = False
        if isinstance(m, SparseTransformerLayer):
            m.in_place_inference = False
        if isinstance(m, DACB):
            m.fast_inference = False
            m.fast_depthwise_backward = False
            m.sub_grid_inference = False
            m.parts_training = False
        if isinstance(m, CSAB):
            m.skip_constant_spatial_gate = False
        if isinstance(m, StridedConvINPReLU):
            m.norm_in_place = False
        if isinstance(m, ScalarPReLU):
            m.fast_backward = False
        if isinstance(m, LayoutKeepingInstanceNorm):
            m.keep_channels_last = False
            m.group_norm_training = False
    return net


def time_forward_and_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> Tuple[float, float]:
    """Seconds for one eval forward without gradients (deep supervision off, as nnU-Net predicts) and one training
    step (deep supervision on, a loss over every output, backward, optimiser step) of an nnU-Net-style network."""
    net.eval()
    net.decoder.deep_supervision = False
    t = time.perf_counter()
    with torch.no_grad():
        net(x)
    t_fwd = time.perf_counter() - t
    net.train()
    net.decoder.deep_supervision = True
    t = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    out = net(x)
    sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out])).backward()
    optimizer.step()
    return t_fwd, time.perf_counter() - t


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_lgms.benchmark.speed_paths", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["2d-256", "hippocampus-3d"])
    parser.add_argument("-tr", "--trainers", nargs="+", default=["nnUNetTrainerLGMSNet"],
                        help="this package's trainers whose networks to time (default: LGMSNet's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    from nnunetv2_lgms.benchmark.models import build_network, find_trainer_class
    from nnunetv2_lgms.benchmark.synthetic_plans import describe, plan_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nnunetv2_lgms_paths_") as tmp:
        for key, trainer in [(k, t) for k in args.presets for t in args.trainers]:
            ctx = plan_preset(key, Path(tmp))
            torch.manual_seed(0)
            fast = build_network(find_trainer_class(trainer), ctx, deep_supervision=True)
            plain = disable_speed_paths(copy.deepcopy(fast))
            x = torch.randn(ctx.batch_size, ctx.num_input_channels, *ctx.patch_size)
            times = {("on", "fwd"): [], ("on", "train"): [], ("off", "fwd"): [], ("off", "train"): []}
            nets = {"on": fast, "off": plain}
            opts = {k: torch.optim.SGD(n.parameters(), 1e-2, momentum=0.99, nesterov=True) for k, n in nets.items()}
            for rep in range(args.repeats + 1):  # the first is a warm-up
                for name in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                    t_fwd, t_train = time_forward_and_step(nets[name], opts[name], x)
                    if rep:
                        times[(name, "fwd")].append(t_fwd)
                        times[(name, "train")].append(t_train)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append([key, trainer, describe(ctx),
                         f"{med[('off', 'fwd')]:.2f} s", f"{med[('on', 'fwd')]:.2f} s",
                         f"{med[('off', 'fwd')] / med[('on', 'fwd')]:.2f}x",
                         f"{med[('off', 'train')]:.2f} s", f"{med[('on', 'train')]:.2f} s",
                         f"{med[('off', 'train')] / med[('on', 'train')]:.2f}x"])
            print(f"[{key}, {trainer}] done", file=sys.stderr, flush=True)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats} "
          f"interleaved repetitions after 1 warm-up\n")
    print(markdown_table(["plan", "trainer", "nnU-Net plan", "forward, paths off", "forward, paths on", "gain",
                          "train step, paths off", "train step, paths on", "gain"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
