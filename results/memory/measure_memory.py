"""Where LGMSNet's training memory goes, against nnU-Net's own network at the same plan and batch, and what
recomputing LGMSNet's full-resolution blocks in the backward (``nnUNetTrainerLGMSNet_recompute``) saves and costs.

For each plan (Kvasir 2D, Hippocampus 3D) and network (nnU-Net's ``PlainConvUNet`` as the stock ``nnUNetTrainer``
builds it; LGMSNet as ``nnUNetTrainerLGMSNet`` builds it; the same with ``nnUNetTrainerLGMSNet_recompute``), on CPU:

* **kept for backward, per block**: every tensor autograd saves during the forward (``saved_tensors_hooks``),
  counted once per storage, parameters left out, attributed to the innermost module running when it was saved and
  grouped into encoder level / decoder level / head / loss;
* **kept after forward**: the net growth of torch's CPU allocations over forward + loss (profiler memory events),
  i.e. everything the backward will read, plus the outputs;
* **peak**: the peak of torch's CPU allocations above the level at the start of one training step (forward, nnU-Net's
  deep-supervision DC+CE loss, backward, SGD step; gradients set to None before), from profiler memory events;
  parameters, gradients-before-the-step and optimiser state are resident before the step and listed apart;
* **peak RSS growth**: the same, cross-checked from the process's resident memory sampled every 2 ms (catches
  memory that torch's allocator does not see, e.g. oneDNN scratch buffers);
* **step time**: the same training step, the networks interleaved round by round, median and range.

Each network's memory is measured in a fresh subprocess (with ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed
large blocks go back to the system and the RSS cross-check means something). ``LGMSNet_recompute_L0`` and
``LGMSNet_recompute_L01`` are memory-only variants (``recompute(net, levels=(0,))`` / ``(0, 1)``) that show why
the trainer recomputes levels 0-2.

Run (from the repository root): ``.venv/bin/python results/memory/measure_memory.py --out results/memory``
(``--plans kvasir_2d``, ``--rounds N``, ``--threads N``, ``--no-time``); ``--tables results/memory`` prints the
Markdown tables of the README from the JSON files.
"""
from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

MB = 2 ** 20

# name: (patch, strides, kernels, batch, input channels, classes, nnU-Net's features per stage)
PLANS = {
    "kvasir_2d": ((128, 128), [[1, 1]] + [[2, 2]] * 5, [[3, 3]] * 6, 50, 3, 2, [32, 64, 128, 256, 512, 512]),
    "hippocampus_3d": ((40, 56, 40), [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, 9, 1, 3, [32, 64, 128, 256]),
}
NETWORKS = ("nnUNet", "LGMSNet", "LGMSNet_recompute")  # timed
MEMORY_NETWORKS = NETWORKS + ("LGMSNet_recompute_L0", "LGMSNet_recompute_L01")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def plans_manager(plan: str):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from plans_utils import configuration_dict, plans_dict
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    patch, strides, kernels, batch, _, _, features = PLANS[plan]
    plans = plans_dict("2d_48_3pools")
    cfg = configuration_dict(patch, strides, kernels, batch)
    cfg["architecture"]["arch_kwargs"]["features_per_stage"] = features  # as nnU-Net's planner caps them
    plans["configurations"] = {"cfg": cfg}
    pm = PlansManager(plans)
    return pm, pm.get_configuration("cfg")


def build(network: str, plan: str) -> torch.nn.Module:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_lgms.trainers import nnUNetTrainerLGMSNet, nnUNetTrainerLGMSNet_recompute

    from nnunetv2_lgms.acceleration.recompute import recompute

    levels = {"LGMSNet_recompute_L0": (0,), "LGMSNet_recompute_L01": (0, 1)}.get(network)
    trainer = {"nnUNet": nnUNetTrainer, "LGMSNet": nnUNetTrainerLGMSNet,
               "LGMSNet_recompute": nnUNetTrainerLGMSNet_recompute}[network if levels is None else "LGMSNet"]
    pm, cm = plans_manager(plan)
    _, _, _, _, in_ch, n_cls, _ = PLANS[plan]
    torch.manual_seed(0)
    net = trainer.build_network_architecture(pm, cm, in_ch, n_cls, True).train()
    return net if levels is None else recompute(net, levels=levels)


def ds_scales(network: str, plan: str):
    from nnunetv2_lgms.networks.lgmsnet import lgmsnet_deep_supervision_scales

    _, strides, _, _, _, _, _ = PLANS[plan]
    if network == "nnUNet":  # nnUNetTrainer._get_deep_supervision_scales
        return [list(s) for s in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1]
    return lgmsnet_deep_supervision_scales(strides, len(strides[0]))


def nnunet_loss(scales):
    """nnU-Net's loss as ``nnUNetTrainer._build_loss`` builds it for a label dataset (not DDP, not compiled)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / (2 ** i) for i in range(len(scales))])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def batch(plan: str, scales, seed: int = 0):
    patch, _, _, b, in_ch, n_cls, _ = PLANS[plan]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, in_ch, *patch, generator=g)
    seg = torch.randint(0, n_cls, (b, 1, *patch), generator=g).float()
    targets = []
    for s in scales:  # nearest-neighbour downsampling, as nnU-Net's DownsampleSegForDSTransform for these strides
        step = [int(round(1 / v)) for v in s]
        targets.append(seg[(slice(None), slice(None)) + tuple(slice(None, None, k) for k in step)].contiguous())
    return x, targets


def block_of(network: str, name: str, n_stages: int) -> str:
    """Group of a module name: 'encoder L<i>', 'decoder L<i>' (incl. the upsampling into it), 'head L<i>'."""
    parts = name.split(".")
    if not name:
        return "network (outside its blocks)"
    if parts[0] == "encoder":
        if parts[1] == "stem":
            return "encoder L0"
        if parts[1] in ("stages", "pools") and len(parts) > 2:
            return f"encoder L{parts[2]}"
        return "encoder (outside its blocks)"
    if parts[0] == "decoder" and len(parts) > 2:
        i = int(parts[2])
        if network == "nnUNet":  # UNetDecoder: stage s produces encoder level n_stages - 2 - s
            level = n_stages - 2 - i
            return f"head L{level}" if parts[1] == "seg_layers" else f"decoder L{level}"
        return f"head L{i}" if parts[1] == "seg_layers" else f"decoder L{i}"
    return f"{parts[0]} (outside its blocks)"


def saved_per_block(net, network: str, plan: str, x, targets, loss_fn) -> dict:
    """Bytes of the tensors autograd keeps for the backward, per block (each storage once, parameters left out)."""
    n_stages = len(PLANS[plan][1])
    names = {m: n for n, m in net.named_modules()}
    stack = []
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen, per_block = set(), collections.Counter()

    def pre(module, args):
        if module in names:
            stack.append(names[module])

    def post(module, args, out):
        if module in names and stack and stack[-1] == names[module]:
            stack.pop()

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen and storage.nbytes():
            seen.add(key)
            per_block[block_of(network, stack[-1], n_stages) if stack else "loss"] += storage.nbytes()
        return t

    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(x)
            loss = loss_fn(out, targets)
    finally:
        h1.remove()
        h2.remove()
    del out, loss
    return {k: v / MB for k, v in sorted(per_block.items())}


class RssSampler:
    """Peak growth of the resident set size over a ``with`` block, sampled every 2 ms by a thread."""

    def __enter__(self):
        import threading
        self.base = self.peak = _rss()
        self.done = False

        def run():
            while not self.done:
                self.peak = max(self.peak, _rss())
                time.sleep(0.002)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.peak = max(self.peak, _rss())
        return False


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(network: str, plan: str) -> dict:
    from nnunetv2_lgms.benchmark.profiling import cpu_allocation_trace

    net = build(network, plan)
    scales = ds_scales(network, plan)
    loss_fn = nnunet_loss(scales)
    x, targets = batch(plan, scales)
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        optimizer.step()

    step()  # optimiser state allocated, first-call caches warmed
    optimizer.zero_grad(set_to_none=True)
    per_block = saved_per_block(net, network, plan, x, targets, loss_fn)
    gc.collect()
    holder = {}

    def forward_only():
        holder["loss"] = loss_fn(net(x), targets)

    kept, _ = cpu_allocation_trace(forward_only)
    holder.clear()
    gc.collect()
    _, peak = cpu_allocation_trace(step)
    gc.collect()
    optimizer.zero_grad(set_to_none=True)
    with RssSampler() as rss:
        step()
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    state_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                      if torch.is_tensor(v))
    return {"kept_for_backward_per_block_MB": per_block,
            "kept_for_backward_sum_of_blocks_MB": sum(per_block.values()),
            "kept_after_forward_MB": kept / MB, "step_peak_above_start_MB": peak / MB,
            "step_peak_rss_growth_MB": (rss.peak - rss.base) / MB,
            "parameters_MB": param_bytes / MB, "optimizer_state_MB": state_bytes / MB,
            "parameters": sum(p.numel() for p in net.parameters())}


def measure_time(plan: str, rounds: int) -> dict:
    subjects = {}
    for network in NETWORKS:
        net = build(network, plan)
        scales = ds_scales(network, plan)
        loss_fn = nnunet_loss(scales)
        x, targets = batch(plan, scales)
        opt = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
        subjects[network] = (net, loss_fn, x, targets, opt)

    def step(network):
        net, loss_fn, x, targets, opt = subjects[network]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        return time.perf_counter() - t0

    for network in NETWORKS:  # warm-up
        step(network)
    times = collections.defaultdict(list)
    ratio = []
    for r in range(rounds):
        order = NETWORKS if r % 2 == 0 else NETWORKS[::-1]
        this = {network: step(network) for network in order}
        for network, t in this.items():
            times[network].append(t)
        ratio.append(this["LGMSNet_recompute"] / this["LGMSNet"])
        print(f"  round {r}: " + ", ".join(f"{n} {t:.2f} s" for n, t in this.items()), flush=True)
    out = {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "all_s": t}
           for n, t in times.items()}
    out["recompute_over_plain_per_round"] = {"median": statistics.median(ratio), "min": min(ratio),
                                             "max": max(ratio), "all": ratio}
    return out


def memory_in_subprocess(network: str, plan: str, threads: int) -> dict:
    import subprocess
    env = dict(os.environ, **MALLOC_ENV)
    cmd = [sys.executable, __file__, "--one", plan, network, "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def tables(folder: Path) -> str:
    """The README's Markdown tables from ``<folder>/<plan>.json``."""
    text = []
    for plan in PLANS:
        path = folder / f"{plan}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        mem, nets = r["memory"], list(r["memory"])
        text.append(f"### {plan} (batch {r['plan']['batch']}, patch {r['plan']['patch']})\n")
        text.append("| MB | " + " | ".join(nets) + " |")
        text.append("|---|" + "---:|" * len(nets))
        for key, label in [("step_peak_above_start_MB", "training step peak (profiler)"),
                           ("step_peak_rss_growth_MB", "training step peak (RSS growth)"),
                           ("kept_after_forward_MB", "kept after forward"),
                           ("parameters_MB", "parameters"), ("optimizer_state_MB", "optimizer state (SGD momentum)")]:
            text.append(f"| {label} | " + " | ".join(f"{mem[n][key]:.0f}" for n in nets) + " |")
        total = {n: mem[n]["step_peak_above_start_MB"] + 2 * mem[n]["parameters_MB"] for n in nets}
        text.append("| **peak + parameters + optimizer state** | " + " | ".join(f"**{total[n]:.0f}**" for n in nets)
                    + " |")
        blocks = [n for n in ("nnUNet", "LGMSNet", "LGMSNet_recompute") if n in mem]
        keys = sorted(set().union(*[mem[n]["kept_for_backward_per_block_MB"] for n in blocks]),
                      key=lambda k: (k.split()[0] != "encoder", k.split()[0] != "decoder", k))
        text.append("\nKept for backward, per block (saved tensors, MB):\n")
        text.append("| block | " + " | ".join(blocks) + " |")
        text.append("|---|" + "---:|" * len(blocks))
        for k in keys:
            text.append(f"| {k} | " + " | ".join(f"{mem[n]['kept_for_backward_per_block_MB'].get(k, 0):.0f}"
                                                  for n in blocks) + " |")
        text.append("| sum | " + " | ".join(f"{mem[n]['kept_for_backward_sum_of_blocks_MB']:.0f}" for n in blocks)
                    + " |")
        if "time" in r:
            t = r["time"]
            text.append(f"\nTraining step time ({len(t['nnUNet']['all_s'])} interleaved rounds, "
                        f"{r['machine']['torch_threads']} torch thread(s)):\n")
            text.append("| network | median s | min s | max s |")
            text.append("|---|---:|---:|---:|")
            for n in NETWORKS:
                text.append(f"| {n} | {t[n]['median_s']:.2f} | {t[n]['min_s']:.2f} | {t[n]['max_s']:.2f} |")
            q = t["recompute_over_plain_per_round"]
            text.append(f"\nLGMSNet_recompute / LGMSNet per round: median {q['median']:.2f}, "
                        f"range {q['min']:.2f}-{q['max']:.2f}\n")
        text.append("")
    return "\n".join(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/memory")
    ap.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("PLAN", "NETWORK"), help=argparse.SUPPRESS)
    ap.add_argument("--tables", metavar="FOLDER", help="print the Markdown tables from the JSON files in FOLDER")
    args = ap.parse_args(argv)
    if args.tables:
        print(tables(Path(args.tables)))
        return
    torch.set_num_threads(args.threads)
    if args.one:
        print("RESULT " + json.dumps(measure_memory(args.one[1], args.one[0])), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for plan in args.plans:
        patch, strides, kernels, b, in_ch, n_cls, features = PLANS[plan]
        result = {"plan": {"patch": patch, "strides": strides, "kernels": kernels, "batch": b,
                           "input_channels": in_ch, "classes": n_cls, "nnunet_features": features},
                  "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": args.threads,
                              "torch": torch.__version__, "python": platform.python_version()},
                  "command": "python results/memory/measure_memory.py " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "memory": {}}
        for network in MEMORY_NETWORKS:
            print(f"{plan}: memory of {network}", flush=True)
            result["memory"][network] = memory_in_subprocess(network, plan, args.threads)
            print(json.dumps({k: v for k, v in result["memory"][network].items() if not isinstance(v, dict)}),
                  flush=True)
        if not args.no_time:
            print(f"{plan}: step times ({args.rounds} interleaved rounds)", flush=True)
            result["time"] = measure_time(plan, args.rounds)
        (out / f"{plan}.json").write_text(json.dumps(result, indent=1))
        print(f"wrote {out / (plan + '.json')}", flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
