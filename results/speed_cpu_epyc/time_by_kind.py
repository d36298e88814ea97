"""Where each network's CPU time goes by kind of op, and how many FLOPs per second each kind achieves::

    python results/speed_cpu_epyc/time_by_kind.py [--preset 2d-256] [-tr nnUNetTrainer nnUNetTrainerLGMSNet]
                                                  [--repeats 5]

For one eval forward without autograd and one training step (nnU-Net's loss, SGD), every ATen op is timed as it is
dispatched (a ``TorchDispatchMode``; CPU ops run synchronously, so an op's time is its own) and given the FLOPs its
shapes imply:

* convolutions: ``2 x output elements x C_in / groups x kernel volume`` (transposed: per input element); their
  backward that for each of the input and weight gradients it computes;
* matrix products (``mm``, ``addmm``, ``bmm``, ...): ``2 M K N``;
* attention (``scaled_dot_product``): ``4 N heads L_q L_k d`` forward, ``10 N heads L_q L_k d`` backward (the
  scores recomputed, four products), with ``d`` the head width as passed (after any zero padding);
* everything else (norms, activations, copies, pooling, resizing, sums, the optimiser): 0.

So the FLOPs are those of the computation as executed, which can exceed the architecture's count (the zero-padded
attention heads and depthwise kernels of LGMSNet's CPU paths). The networks alternate; medians over ``--repeats``
rounds after one warm-up each. The dispatch hook costs some microseconds per op, so the timed totals run above the
speed report's.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nnunetv2_lgms.benchmark.models import build_network, ensure_ext_trainer, find_trainer_class
from nnunetv2_lgms.benchmark.profiling import _make_targets, build_loss
from nnunetv2_lgms.benchmark.synthetic_plans import plan_preset

KINDS = ("dense conv (k > 1)", "transposed conv", "1x1 conv", "depthwise / grouped conv", "matrix product",
         "attention", "everything else")
CONV_FORWARD = {"convolution", "_convolution", "mkldnn_convolution", "_convolution_pointwise", "conv2d", "conv3d"}
MATRIX_PRODUCTS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"}


def _conv_kind(x_channels: int, weight: torch.Tensor, transposed: bool) -> str:
    if transposed:
        return "transposed conv"
    if x_channels // weight.shape[1] > 1:
        return "depthwise / grouped conv"
    return "1x1 conv" if math.prod(weight.shape[2:]) == 1 else "dense conv (k > 1)"


def kind_and_flops(func, args: Sequence, out) -> Tuple[str, float]:
    name = func._schema.name.split("::")[-1]
    if name in CONV_FORWARD:
        x, weight = args[0], args[1]
        transposed = name == "convolution" and bool(args[6])
        per_element = weight.shape[1] * math.prod(weight.shape[2:])
        flops = 2 * (x.numel() if transposed else out.numel()) * per_element
        return _conv_kind(x.shape[1], weight, transposed), flops
    if name == "convolution_backward":
        grad_out, x, weight, transposed, mask = args[0], args[1], args[2], bool(args[7]), args[10]
        per_element = weight.shape[1] * math.prod(weight.shape[2:])
        forward = 2 * (x.numel() if transposed else grad_out.numel()) * per_element
        return _conv_kind(x.shape[1], weight, transposed), forward * (int(mask[0]) + int(mask[1]))
    if name in MATRIX_PRODUCTS:
        a, b = (args[1], args[2]) if name.startswith(("addmm", "baddbmm")) else (args[0], args[1])
        return "matrix product", 2 * a.numel() * b.shape[-1]
    if "scaled_dot_product" in name:
        backward = name.endswith("_backward")
        q, k = (args[1], args[2]) if backward else (args[0], args[1])
        return "attention", (10 if backward else 4) * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
    return "everything else", 0.0


class OpTimer(TorchDispatchMode):
    """Sums each kind's op time and FLOPs over the ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.seconds = defaultdict(float)
        self.flops = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        kind, flops = kind_and_flops(func, args, first if isinstance(first, torch.Tensor) else None)
        self.seconds[kind] += elapsed
        self.flops[kind] += flops
        return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="2d-256")
    parser.add_argument("-tr", "--trainers", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerLGMSNet"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    ensure_ext_trainer()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = plan_preset(args.preset, Path(tmp))
        torch.manual_seed(0)
        x = torch.randn(ctx.batch_size, ctx.num_input_channels, *ctx.patch_size)
        phases = {}
        for trainer in args.trainers:
            net = build_network(find_trainer_class(trainer), ctx, deep_supervision=True)
            optimizer = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
            with torch.no_grad():
                outputs = net(x)
            loss = build_loss(ctx, len(outputs))
            targets = _make_targets(ctx, outputs, ctx.batch_size, torch.device("cpu"))
            del outputs

            def forward(net=net):
                net.eval()
                net.decoder.deep_supervision = False
                with torch.no_grad():
                    net(x)

            def training_step(net=net, optimizer=optimizer, loss=loss, targets=targets):
                net.train()
                net.decoder.deep_supervision = True
                optimizer.zero_grad(set_to_none=True)
                loss(net(x), targets).backward()
                optimizer.step()

            phases[trainer] = {"forward": forward, "training step": training_step}
        samples = defaultdict(list)
        for fns in phases.values():
            for fn in fns.values():
                fn()  # warm-up
        for _ in range(args.repeats):
            for trainer, fns in phases.items():
                for phase, fn in fns.items():
                    timer = OpTimer()
                    start = time.perf_counter()
                    with timer:
                        fn()
                    samples[trainer, phase].append((time.perf_counter() - start, dict(timer.seconds),
                                                    dict(timer.flops)))
    print(f"# Time by kind of op: plan {args.preset} (batch {ctx.batch_size}, patch "
          f"{'x'.join(map(str, ctx.patch_size))}), CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"medians of {args.repeats}\n")
    print(f"Command: `python results/speed_cpu_epyc/time_by_kind.py {' '.join(sys.argv[1:])}`".rstrip() + "\n")
    for phase in ("forward", "training step"):
        for trainer in args.trainers:
            rows = samples[trainer, phase]
            total = statistics.median(r[0] for r in rows)
            flops = sum(rows[0][2].values())
            print(f"## {phase}, {trainer}: {total:.2f} s (timed), {flops / 1e9:.0f} GFLOP, "
                  f"{flops / total / 1e9:.0f} GFLOP/s overall\n")
            print("| kind | time | share | GFLOP | GFLOP/s |\n|---|---:|---:|---:|---:|")
            for kind in KINDS:
                seconds = statistics.median(r[1].get(kind, 0.0) for r in rows)
                kind_flops = rows[0][2].get(kind, 0.0)
                if not seconds and not kind_flops:
                    continue
                rate = f"{kind_flops / seconds / 1e9:.0f}" if kind_flops and seconds else "–"
                print(f"| {kind} | {seconds * 1e3:.0f} ms | {100 * seconds / total:.0f} % | {kind_flops / 1e9:.1f} | "
                      f"{rate} |")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
