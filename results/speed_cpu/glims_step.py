"""Median GLIMS training step (SGD, a mean over every deep-supervision output) at a speed-report plan, after one
warm-up step; prints the checkout it imported. For comparing two checkouts in alternating processes::

    git worktree add /tmp/old 3afeed6   # before the fifth CPU session; the log: the working tree at 6ab9f29
    for round in 1 2; do for preset in 2d-256 hippocampus-3d; do
      (cd /tmp && PYTHONPATH=/tmp/old python $OLDPWD/results/speed_cpu/glims_step.py $preset 2)
      (cd /tmp && python $OLDPWD/results/speed_cpu/glims_step.py $preset 2)
    done; done
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import nnunetv2_lgms
from nnunetv2_lgms.benchmark.models import build_network, ensure_ext_trainer, find_trainer_class
from nnunetv2_lgms.benchmark.synthetic_plans import plan_preset


def main(preset: str, steps: int) -> int:
    torch.set_num_threads(2)
    ensure_ext_trainer()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = plan_preset(preset, Path(tmp))
        torch.manual_seed(0)
        net = build_network(find_trainer_class("nnUNetTrainerGLIMS"), ctx, deep_supervision=True).train()
    x = torch.randn(ctx.batch_size, ctx.num_input_channels, *ctx.patch_size)
    opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sum(o.float().mean() for o in net(x)).backward()
        opt.step()
        return time.perf_counter() - t

    step()  # warm-up
    times = [step() for _ in range(steps)]
    print(f"{preset} {Path(nnunetv2_lgms.__file__).parent.parent} steps {[round(t, 2) for t in times]} "
          f"median {statistics.median(times):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2))
