"""``nnunetv2_lgms paper-check [--json] [--model NAME]``: build every architecture at its published configuration
and print exact parameters and forward FLOPs beside the reference figures.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-accumulate, so GMACs =
GFLOPs / 2; convolutions, matmuls and attention; norms and activations are not counted). Papers in this field
usually print MACs and call them FLOPs.
"""
from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--model", action="append", default=None,
                        help="only rows whose model name starts with this (repeatable), e.g. LGMSNet-2D")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting (3D rows take seconds each)")


def collect(models=None, flops: bool = True) -> list:
    from nnunetv2_lgms.flops import count_flops
    from nnunetv2_lgms.paper_configs import PAPER_CONFIGS

    rows = []
    for cfg in PAPER_CONFIGS:
        if models and not any(cfg.model.startswith(m) for m in models):
            continue
        net = cfg.build()
        params = cfg.count_params(net)
        total = count_flops(net, cfg.input_shape) if flops else None
        rows.append({"model": cfg.model, "config": cfg.config, "params": params,
                     "reference_params": cfg.reference_params, "params_match": params == cfg.reference_params,
                     "gflops": None if total is None else round(total / 1e9, 3),
                     "gmacs": None if total is None else round(total / 2e9, 3),
                     "paper": cfg.paper})
    return rows


def run(args) -> int:
    rows = collect(args.model, flops=not args.no_flops)
    if not rows:
        print(f"no architecture matches {args.model}")
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| model | config | params | reference (official code) | match | GFLOPs | GMACs | paper |")
        print("|---|---|---:|---:|:-:|---:|---:|---|")
        for r in rows:
            fl = "-" if r["gflops"] is None else f"{r['gflops']:.2f}"
            mac = "-" if r["gmacs"] is None else f"{r['gmacs']:.2f}"
            print(f"| {r['model']} | {r['config']} | {r['params']:,} | {r['reference_params']:,} | "
                  f"{'yes' if r['params_match'] else 'NO'} | {fl} | {mac} | {r['paper']} |")
        print("\nFLOPs: torch FlopCounterMode, batch 1, 2 FLOPs per MAC (GMACs = GFLOPs / 2).")
    return 0 if all(r["params_match"] for r in rows) else 1
