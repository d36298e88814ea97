"""Where a network's CPU time goes: ``torch.profiler`` self time per ATen op, summed over one eval forward without
autograd and one training step (each after one unprofiled warm-up), at a speed-report plan::

    python results/speed_cpu/op_profile.py [--trainer nnUNetTrainerLGMSNet] [--preset 2d-256] [--top 12]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from nnunetv2_lgms.benchmark.models import build_network, ensure_ext_trainer, find_trainer_class
from nnunetv2_lgms.benchmark.synthetic_plans import plan_preset
from nnunetv2_lgms.benchmark.tables import markdown_table


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", default="nnUNetTrainerLGMSNet")
    parser.add_argument("--preset", default="2d-256")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    ensure_ext_trainer()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = plan_preset(args.preset, Path(tmp))
        torch.manual_seed(0)
        net = build_network(find_trainer_class(args.trainer), ctx, deep_supervision=True)
        opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
        x = torch.randn(ctx.batch_size, ctx.num_input_channels, *ctx.patch_size)
        def forward():
            net.eval()
            net.decoder.deep_supervision = False
            with torch.no_grad():
                net(x)

        def training_step():
            net.train()
            net.decoder.deep_supervision = True
            opt.zero_grad(set_to_none=True)
            out = net(x)
            sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out])).backward()
            opt.step()

        tables = {}
        for phase, fn in (("forward", forward), ("training step", training_step)):
            fn()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
            total = sum(e.self_cpu_time_total for e in events)
            rows = [[e.key, e.count, f"{e.self_cpu_time_total / 1e3:.1f} ms",
                     f"{100 * e.self_cpu_time_total / total:.1f} %"]
                    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]]
            tables[phase] = (total, rows)
    print(f"{args.trainer}, plan {args.preset} (batch {ctx.batch_size}), CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    for phase, (total, rows) in tables.items():
        print(f"### {phase}: {total / 1e6:.2f} s of op self time\n")
        print(markdown_table(["op", "calls", "self time", "share"], rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
