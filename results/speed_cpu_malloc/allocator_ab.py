"""What two glibc malloc settings change on CPU:
nnU-Net's network and LGMSNet timed in child processes that alternate between the default allocator and the tuned
one (the variables act only at process start), forward at the plan's batch in eval mode and one training step,
and the child's peak resident memory (one network per child, so the peak is that network's)::

    python results/speed_cpu_malloc/allocator_ab.py [--preset 2d-256] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Optional, Sequence

from nnunetv2_lgms.benchmark.tables import markdown_table

TRAINERS = ("nnUNetTrainer", "nnUNetTrainerLGMSNet")
# 2**31 - 1: the largest value glibc's mallopt takes (an int)
GLIBC_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "2147483647", "MALLOC_TRIM_THRESHOLD_": "2147483647"}

_CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
import torch
from nnunetv2_lgms.benchmark.models import build_network, ensure_ext_trainer, find_trainer_class
from nnunetv2_lgms.benchmark.speed_paths import time_forward_and_step
from nnunetv2_lgms.benchmark.synthetic_plans import plan_preset
ensure_ext_trainer()
preset, name = sys.argv[1:3]
ctx = plan_preset(preset, Path(tempfile.mkdtemp()))
x = torch.randn(ctx.batch_size, ctx.num_input_channels, *ctx.patch_size)
torch.manual_seed(0)
net = build_network(find_trainer_class(name), ctx, True)
opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
fwd, step = [], []
for rep in range(3):  # the first is a warm-up
    t_fwd, t_step = time_forward_and_step(net, opt, x)
    fwd.append(t_fwd)
    step.append(t_step)
print(json.dumps({name: {"forward_s": min(fwd[1:]), "train_step_s": min(step[1:]),
                         "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}}))
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python results/speed_cpu_malloc/allocator_ab.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="2d-256")
    parser.add_argument("--rounds", type=int, default=3, help="child processes per setting, alternating")
    parser.add_argument("-tr", "--trainers", nargs="+", default=list(TRAINERS))
    args = parser.parse_args(argv)
    base = {k: v for k, v in os.environ.items() if k not in GLIBC_MALLOC_ENV}
    settings = {"default": base, "tuned": {**base, **GLIBC_MALLOC_ENV}}
    keys = ("forward_s", "train_step_s", "peak_rss_gb")
    samples = {s: {t: {k: [] for k in keys} for t in args.trainers} for s in settings}
    for r in range(args.rounds):
        for setting in (("default", "tuned") if r % 2 == 0 else ("tuned", "default")):
            for trainer in args.trainers:
                res = json.loads(subprocess.run([sys.executable, "-c", _CHILD, args.preset, trainer],
                                                env=settings[setting], capture_output=True, text=True,
                                                check=True).stdout.strip().splitlines()[-1])
                for k, v in res[trainer].items():
                    samples[setting][trainer][k].append(v)
            print(f"round {r + 1}/{args.rounds} {setting} done", file=sys.stderr, flush=True)
    med = {s: {t: {k: statistics.median(v) for k, v in d.items()} for t, d in ts.items()} for s, ts in samples.items()}
    ref = args.trainers[0]
    rows = []
    for t in args.trainers:
        cells = [t]
        for k in ("forward_s", "train_step_s"):
            d, n = med["default"][t][k], med["tuned"][t][k]
            cells += [f"{d:.2f} s", f"{n:.2f} s", f"{d / n:.2f}x"]
        cells += [f"{med['default'][t]['peak_rss_gb']:.1f} GB", f"{med['tuned'][t]['peak_rss_gb']:.1f} GB"]
        rows.append(cells)
    tuned = " ".join(f"{k}={v}" for k, v in GLIBC_MALLOC_ENV.items())
    print(f"{args.preset}, {args.rounds} child processes per setting and network (alternating), each the best of 2 "
          f"repetitions after a warm-up; medians over the processes. tuned = {tuned}\n")
    print(markdown_table(["network", "forward, default", "forward, tuned", "gain", "train step, default",
                          "train step, tuned", "gain", "peak RSS, default", "peak RSS, tuned"], rows))
    other = args.trainers[1:] if len(args.trainers) > 1 else []
    for s in settings:
        r = med[s]
        for t in other:
            print(f"\n{s} allocator: {t} vs {ref}: forward {r[ref]['forward_s'] / r[t]['forward_s']:.2f}x faster, "
                  f"train step {r[ref]['train_step_s'] / r[t]['train_step_s']:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
