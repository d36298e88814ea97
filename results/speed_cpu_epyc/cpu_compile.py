"""Eval forward on CPU, eager against ``torch.compile`` (Inductor's C++ backend), per network::

    python results/speed_cpu_epyc/cpu_compile.py [--preset 2d-256] [-tr nnUNetTrainer nnUNetTrainerLGMSNet]
                                                 [--repeats 5]

nnU-Net 2.8 never compiles on CPU (``nnUNetTrainer._do_i_compile`` returns False for a CPU device), so the CPU
speed targets of issue 6 are eager ones; this measures what compiling would change. Under ``torch.compile`` this
package's eager CPU fast paths step aside (they check ``is_compiling``) and Inductor compiles the plain modules.
Without autograd, at the plan's batch; the four variants alternate, medians over ``--repeats`` rounds after the
compile (timed separately, with the first call).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from nnunetv2_lgms.benchmark.models import build_network, ensure_ext_trainer, find_trainer_class
from nnunetv2_lgms.benchmark.synthetic_plans import plan_preset


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="2d-256")
    parser.add_argument("-tr", "--trainers", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerLGMSNet"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    ensure_ext_trainer()
    print(f"plan {args.preset}, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = plan_preset(args.preset, Path(tmp))
        torch.manual_seed(0)
        x = torch.randn(ctx.batch_size, ctx.num_input_channels, *ctx.patch_size)
        variants = {}
        for trainer in args.trainers:
            net = build_network(find_trainer_class(trainer), ctx, deep_supervision=False).eval()
            net.decoder.deep_supervision = False
            compiled = torch.compile(net)
            start = time.perf_counter()
            with torch.no_grad():
                difference = (compiled(x) - net(x)).abs().max().item()
            print(f"{trainer}: compile and first call {time.perf_counter() - start:.0f} s; largest difference to "
                  f"eager {difference:.1e}", flush=True)
            variants[trainer, "eager"], variants[trainer, "compiled"] = net, compiled
        seconds = defaultdict(list)
        with torch.no_grad():
            for _ in range(args.repeats):
                for key, module in variants.items():
                    start = time.perf_counter()
                    module(x)
                    seconds[key].append(time.perf_counter() - start)
    reference = args.trainers[0]
    print(f"\nforward at batch {ctx.batch_size}, medians of {args.repeats} (every sample in brackets):")
    for (trainer, mode), values in seconds.items():
        ratio = statistics.median(seconds[reference, mode]) / statistics.median(values)
        print(f"  {trainer:22s} {mode:8s} {statistics.median(values):6.2f} s  ({reference} {mode} / this: "
              f"{ratio:.2f})  [{', '.join(f'{v:.2f}' for v in values)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
