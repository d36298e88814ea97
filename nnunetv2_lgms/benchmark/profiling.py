"""Compute cost of trainers' networks on one nnU-Net plan, measured interleaved so the ratios hold on a noisy machine.

Each network is built by ``trainer_class.build_network_architecture`` from the plans exactly as nnU-Net's training
(deep supervision on) and prediction (deep supervision off, the training weights loaded) build it. Measured:

* parameters (all, as trained and saved; and the inference path, see :func:`models.inference_parameters`);
* forward FLOPs per patch (``FlopCounterMode`` via :func:`nnunetv2_lgms.flops.count_flops`; GMACs = GFLOPs / 2);
* forward time (eval, ``no_grad``) at batch 1 and at the plan's batch size;
* one training step at the plan's batch size: forward, nnU-Net's loss (DC+CE, or DC+BCE for regions) over all
  deep-supervision outputs with nnU-Net's weights (1/2^i, the lowest 0, normalised), backward, gradient clipping
  at 12, and a step of nnU-Net's default optimiser (SGD, momentum 0.99, Nesterov); autocast + GradScaler on CUDA,
  as ``nnUNetTrainer.train_step`` does;
* peak memory of that training step (and of a batch-1 forward): on CUDA ``torch.cuda.max_memory_allocated``; on
  CPU the tensors alive when the step starts (parameters, buffers, optimiser state, batch) plus the peak
  of torch's CPU allocations during the step, from ``torch.profiler`` memory events (an extra, untimed step).
  Both count tensor memory only, not the allocator's cache or the process's other memory;
* sliding-window inference of one real preprocessed case through ``nnUNetPredictor`` (manually initialised), with
  and without test-time mirroring.

Timings are medians over ``repeats`` after ``warmup`` repetitions; every repetition runs each trainer once, in a
rotated round-robin order, so machine load affects all trainers alike.
"""
from __future__ import annotations

import contextlib
import io
import statistics
import time
import types
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nnunetv2_lgms.benchmark.models import (CUDA_GRAPH_MODES, BenchmarkError, PlanContext, build_network,
                                            find_trainer_class)
from nnunetv2_lgms.networks.common import count_parameters, inference_parameters
from nnunetv2_lgms.acceleration.cuda_graphs import GraphedInference, GraphedModule
from nnunetv2_lgms.benchmark.tables import markdown_table, ratio

MB = 1e6


@dataclass
class ProfileSettings:
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 1
    sliding_window: bool = True
    sliding_window_repeats: int = 1
    step_size: float = 0.5
    case: Optional[str] = None
    memory: bool = True
    compile: bool = False  # torch.compile both networks (as nnU-Net does on CUDA); FLOPs counted on the eager net
    batch: bool = True  # also time the forward and the training step at the plan's batch (off: batch-1 forward only)
    # CUDA-graph replay of the eval forward (CUDA only): "default" as the networks ship (this package's replay,
    # nnU-Net's network eager), "all" (nnU-Net's network replayed too, GraphedModule), "off" (every network eager)
    cuda_graphs: str = "default"

    def __post_init__(self):
        if self.cuda_graphs not in CUDA_GRAPH_MODES:
            raise BenchmarkError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPH_MODES)}, got {self.cuda_graphs!r}")


class _Subject:
    """One trainer's networks, inputs, loss and optimiser."""

    def __init__(self, name: str, ctx: PlanContext, device: torch.device, seed: int = 0,
                 cuda_graphs: str = "default"):
        self.name = name
        self.cls = find_trainer_class(name)
        torch.manual_seed(seed)
        try:
            self.train_net = build_network(self.cls, ctx, True).to(device)
            self.eval_net = build_network(self.cls, ctx, False).to(device)
        except Exception as e:  # noqa: BLE001 - report which trainer's network does not build on this plan
            raise BenchmarkError(f"{name}: build_network_architecture failed on {ctx.dataset_name} "
                                 f"{ctx.configuration}: {type(e).__name__}: {e}") from e
        # the predictor loads the training checkpoint into the deep-supervision-off network
        self.eval_net.load_state_dict(self.train_net.state_dict())
        if cuda_graphs == "off" and isinstance(self.eval_net, GraphedInference):
            self.eval_net.cuda_graph_inference = False
        elif cuda_graphs == "all" and not isinstance(self.eval_net, GraphedInference):
            self.eval_net = GraphedModule(self.eval_net)
        self.eval_net.eval()
        self.params = count_parameters(self.train_net)
        self.params_inference = inference_parameters(self.eval_net)
        self.mirror_axes = _mirror_axes(self.cls, ctx)
        self.optimizer = torch.optim.SGD(self.train_net.parameters(), 1e-2, momentum=0.99, nesterov=True,
                                         weight_decay=3e-5)
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        self.results: Dict[str, List[float]] = {}

    def record(self, key: str, value: float) -> None:
        self.results.setdefault(key, []).append(value)


def _mirror_axes(trainer_class, ctx: PlanContext):
    """The trainer's ``inference_allowed_mirroring_axes`` (what its checkpoint stores); nnU-Net's default
    ``(0, 1[, 2])`` if the trainer's method needs more than the configuration to answer."""
    probe = types.SimpleNamespace(configuration_manager=ctx.configuration_manager,
                                  print_to_log_file=lambda *a, **k: None)
    try:
        return tuple(trainer_class.configure_rotation_dummyDA_mirroring_and_inital_patch_size(probe)[3])
    except Exception:  # noqa: BLE001
        return tuple(range(len(ctx.patch_size)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    return torch.autocast(device.type, enabled=True) if device.type == "cuda" else contextlib.nullcontext()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def build_loss(ctx: PlanContext, num_outputs: int):
    """nnU-Net's ``_build_loss`` (without compile/DDP) for ``num_outputs`` deep-supervision outputs."""
    import numpy as np
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    lm = ctx.label_manager
    batch_dice = ctx.configuration_manager.batch_dice
    if lm.has_regions:
        loss = DC_and_BCE_loss({}, {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
                               use_ignore_label=lm.ignore_label is not None, dice_class=MemoryEfficientSoftDiceLoss)
    else:
        loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                              weight_ce=1, weight_dice=1, ignore_label=lm.ignore_label,
                              dice_class=MemoryEfficientSoftDiceLoss)
    if num_outputs == 1:
        return loss
    weights = np.array([1 / (2 ** i) for i in range(num_outputs)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def _make_targets(ctx: PlanContext, outputs, batch: int, device: torch.device, seed: int = 0):
    """Random targets shaped like nnU-Net's (label map (B, 1, ...), or one channel per region), one per output."""
    g = torch.Generator().manual_seed(seed)
    lm = ctx.label_manager
    outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    full = outs[0].shape[2:]
    if lm.has_regions:
        target = (torch.rand((batch, ctx.num_output_channels, *full), generator=g) > 0.5).float()
    else:
        n_labels = max(2, len(lm.foreground_labels) + 1)
        target = torch.randint(0, n_labels, (batch, 1, *full), generator=g).float()
    targets = [target if o.shape[2:] == full else
               torch.nn.functional.interpolate(target, size=tuple(o.shape[2:]), mode="nearest") for o in outs]
    targets = [t.to(device) for t in targets]
    return targets if isinstance(outputs, (list, tuple)) else targets[0]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _resident_bytes(subject: _Subject, *extra) -> int:
    """Tensors alive before the measured call. Gradients are left out: the step frees them first
    (``zero_grad(set_to_none=True)``), which the profiler cannot see for blocks allocated before it started, and
    re-allocates them in backward, which it counts."""
    net = subject.train_net
    state = [v for s in subject.optimizer.state.values() for v in s.values()]
    return _tensor_bytes(list(net.parameters()) + list(net.buffers()) + state + list(extra))


def _cpu_peak_bytes(fn) -> int:
    """Peak of torch's CPU allocations above the level at the start of ``fn``, from profiler memory events."""
    return cpu_allocation_trace(fn)[1]


def cpu_allocation_trace(fn) -> Tuple[int, int]:
    """(level at the end, peak) of torch's CPU allocations during ``fn`` relative to its start, in bytes, from
    profiler memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            level += e.nbytes()
            peak = max(peak, level)
    return level, peak


def _measure_memory(subject: _Subject, fn, device: torch.device, *resident) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / MB
    return (_resident_bytes(subject, *resident) + _cpu_peak_bytes(fn)) / MB


def load_case(ctx: PlanContext, identifier: Optional[str] = None):
    """One preprocessed case (nnU-Net's dataset class for the configuration's folder) as a float tensor (C, ...)."""
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = ctx.data_folder
    if not folder.is_dir() or not any(folder.iterdir()):
        raise BenchmarkError(f"{folder} holds no preprocessed cases for the sliding-window timing; run "
                             f"nnUNetv2_plan_and_preprocess -d {ctx.dataset_name} -c {ctx.configuration}, "
                             f"or pass --no-sliding-window")
    dataset_class = infer_dataset_class(str(folder))
    identifiers = sorted(dataset_class.get_identifiers(str(folder)))
    if identifier is None:
        identifier = identifiers[0]
    elif identifier not in identifiers:
        raise BenchmarkError(f"case {identifier!r} not in {folder} (first cases: {', '.join(identifiers[:5])})")
    data, _seg, _prev, _props = dataset_class(str(folder), [identifier]).load_case(identifier)
    data = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
    missing = ctx.num_input_channels - data.shape[0]
    if missing > 0:  # cascade: the previous stage's one-hot maps would be stacked on top; zeros cost the same
        data = torch.cat([data, torch.zeros((missing, *data.shape[1:]))])
    return identifier, data


def _predictor(subject: _Subject, ctx: PlanContext, device: torch.device, mirror: bool, step_size: float):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):  # its CPU notice about perform_everything_on_device
        predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=mirror,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    allow_tqdm=False)
    predictor.manual_initialization(subject.eval_net, ctx.plans_manager, ctx.configuration_manager,
                                    [subject.eval_net.state_dict()], ctx.dataset_json, subject.name,
                                    subject.mirror_axes)
    return predictor


def _n_tiles(predictor, data: torch.Tensor) -> int:
    patch = predictor.configuration_manager.patch_size
    spatial = list(data.shape[1:])
    offset = len(spatial) - len(patch)
    padded = spatial[:offset] + [max(s, p) for s, p in zip(spatial[offset:], patch)]
    return len(predictor._internal_get_sliding_window_slicers(tuple(padded)))


def profile_trainers(ctx: PlanContext, trainers: Sequence[str], settings: ProfileSettings,
                     log=print) -> List[dict]:
    from nnunetv2_lgms.flops import count_flops

    device = torch.device(settings.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchmarkError("--device cuda but torch.cuda.is_available() is False")
        torch.backends.cudnn.benchmark = True  # as nnUNetv2_train sets it on CUDA
    patch, batch, c_in = ctx.patch_size, ctx.batch_size, ctx.num_input_channels
    case_id, data = load_case(ctx, settings.case) if settings.sliding_window else (None, None)  # fail early
    subjects = []
    for name in trainers:
        log(f"building {name} ...")
        subjects.append(_Subject(name, ctx, device, cuda_graphs=settings.cuda_graphs))
    flops = {}
    for s in subjects:
        flops[s.name] = count_flops(s.eval_net, (1, c_in, *patch), device=settings.device)
        if settings.compile:
            # static shapes: batch 1 and the plan's batch each get their own graph, as a predictor (batch 1) and a
            # trainer (the plan's batch) would compile them, instead of one dynamic-batch graph for both
            s.train_net = torch.compile(s.train_net, dynamic=False)
            s.eval_net = torch.compile(s.eval_net, dynamic=False)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn((1, c_in, *patch), generator=g).to(device)
    xb = torch.randn((batch if settings.batch else 1, c_in, *patch), generator=g).to(device)
    loss_fns, targets = {}, {}
    for s in (subjects if settings.batch else []):
        with torch.no_grad():  # output shapes only: the eager module, not one more compiled graph
            out = getattr(s.train_net, "_orig_mod", s.train_net)(xb)
        n_out = len(out) if isinstance(out, (list, tuple)) else 1
        loss_fns[s.name] = build_loss(ctx, n_out).to(device)
        targets[s.name] = _make_targets(ctx, out, batch, device)
        del out

    def forward(s, x):
        def fn():
            with torch.no_grad(), _autocast(device):
                s.eval_net(x)
        return fn

    def train_step(s):
        def fn():
            s.train_net.train()
            s.optimizer.zero_grad(set_to_none=True)
            with _autocast(device):
                loss = loss_fns[s.name](s.train_net(xb), targets[s.name])
            if s.scaler is not None:
                s.scaler.scale(loss).backward()
                s.scaler.unscale_(s.optimizer)
                torch.nn.utils.clip_grad_norm_(s.train_net.parameters(), 12)
                s.scaler.step(s.optimizer)
                s.scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(s.train_net.parameters(), 12)
                s.optimizer.step()
        return fn

    total = settings.warmup + settings.repeats
    for rep in range(total):
        order = subjects[rep % len(subjects):] + subjects[:rep % len(subjects)]
        for s in order:
            t_bs1 = _timed(forward(s, x1), device)
            if rep >= settings.warmup:
                s.record("inference_bs1_s", t_bs1)
            if settings.batch:
                t_bs = _timed(forward(s, xb), device)
                t_train = _timed(train_step(s), device)
                if rep >= settings.warmup:
                    s.record("inference_s", t_bs)
                    s.record("train_step_s", t_train)
        log(f"repetition {rep + 1}/{total}{' (warm-up)' if rep < settings.warmup else ''} done")

    memory = {}
    if settings.memory and settings.batch:
        for s in subjects:
            memory[s.name] = (_measure_memory(s, train_step(s), device, xb, *_flat(targets[s.name])),
                              _measure_memory(s, forward(s, x1), device, x1))

    case_shape, n_tiles = None, None
    if settings.sliding_window:
        case_shape = list(data.shape)
        log(f"sliding window on preprocessed case {case_id} {tuple(data.shape)} ...")
        for rep in range(settings.sliding_window_repeats):
            order = subjects[rep % len(subjects):] + subjects[:rep % len(subjects)]
            for s in order:
                for mirror, key in ((False, "sliding_window_s"), (True, "sliding_window_mirror_s")):
                    predictor = _predictor(s, ctx, device, mirror, settings.step_size)
                    n_tiles = _n_tiles(predictor, data)
                    s.record(key, _timed(lambda: predictor.predict_sliding_window_return_logits(data), device))
            log(f"sliding window repetition {rep + 1}/{settings.sliding_window_repeats} done")

    meta = environment(device)
    meta.update({"dataset": ctx.dataset_name, "configuration": ctx.configuration, "plans": ctx.plans_identifier,
                 "patch_size": list(patch), "batch_size": batch, "input_channels": c_in,
                 "output_channels": ctx.num_output_channels, "repeats": settings.repeats, "warmup": settings.warmup,
                 "compiled": settings.compile,
                 "cuda_graphs": settings.cuda_graphs if device.type == "cuda" else None,
                 "cudnn_benchmark": device.type == "cuda",
                 "peak_memory_method": memory_method(device) if settings.memory and settings.batch else None,
                 "sliding_window_case": case_id, "sliding_window_case_shape": case_shape,
                 "sliding_window_tiles": n_tiles, "sliding_window_step_size": settings.step_size,
                 "sliding_window_repeats": settings.sliding_window_repeats if settings.sliding_window else 0})
    rows = []
    for s in subjects:
        fl = flops[s.name]
        row = {"trainer": s.name, "params": s.params, "params_inference": s.params_inference,
               "gflops": fl / 1e9, "gmacs": fl / 2e9,
               "inference_bs1_s": _median(s.results.get("inference_bs1_s")),
               "inference_s": _median(s.results.get("inference_s")),
               "train_step_s": _median(s.results.get("train_step_s")),
               "peak_memory_mb": memory.get(s.name, (None, None))[0],
               "peak_memory_inference_bs1_mb": memory.get(s.name, (None, None))[1],
               "sliding_window_s": _median(s.results.get("sliding_window_s")),
               "sliding_window_mirror_s": _median(s.results.get("sliding_window_mirror_s")),
               "mirror_axes": list(s.mirror_axes),
               "samples": {k: v for k, v in s.results.items()}}
        row.update(meta)
        rows.append(row)
    return rows


def _flat(t):
    return list(t) if isinstance(t, (list, tuple)) else [t]


def _median(values: Optional[List[float]]) -> Optional[float]:
    return statistics.median(values) if values else None


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated (tensor memory, includes parameters and optimiser state)"
    return ("CPU: tensors alive at the start (parameters, buffers, optimiser state, batch) + peak of torch "
            "CPU allocations during the step (torch.profiler memory events); tensor memory, not process RSS")


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; else the platform's machine name) and the vector instruction
    set PyTorch's CPU kernels use, e.g. ``AMD EPYC, AVX2``. CPU timing ratios differ between hosts, so a report
    names its host."""
    import platform

    name = ""
    try:
        with open(cpuinfo) as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return f"{name}, {capability}" if capability else name


def environment(device: torch.device) -> dict:
    import platform
    import os

    # glibc malloc settings change CPU timings, so a report records them
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    env = {"device": str(device), "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
           "python": platform.python_version(), "amp": device.type == "cuda", "malloc_env": malloc_env}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = cpu_description()
    try:
        from importlib.metadata import version
        env["nnunetv2_version"] = version("nnunetv2")
    except Exception:  # noqa: BLE001
        pass
    return env


def _fmt_graphs(mode: Optional[str]) -> str:
    return {None: "", "default": ", CUDA graphs as shipped (this package's networks replay their eval forward; "
                                 "nnU-Net's network eager)",
            "all": ", CUDA graphs for every network's eval forward", "off": ", no CUDA graphs"}[mode]


def _fmt_malloc(settings: Optional[dict]) -> str:
    return ", " + " ".join(f"{k}={v}" for k, v in settings.items()) if settings else ""


def _fmt_s(v: Optional[float]) -> str:
    if v is None:
        return "–"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def render_markdown(rows: List[dict]) -> str:
    ref = m = rows[0]
    lines = [f"{m['dataset']} · {m['configuration']} · {m['plans']}: patch {'x'.join(map(str, m['patch_size']))}, "
             f"batch {m['batch_size']}, {m['input_channels']} in / {m['output_channels']} out",
             f"device {m['device']} ({m['device_name']}), torch {m['torch_version']}, {m['torch_threads']} threads, "
             f"AMP {'on' if m['amp'] else 'off'}, torch.compile {'on' if m.get('compiled') else 'off'}"
             f"{_fmt_graphs(m.get('cuda_graphs'))}"
             f"{_fmt_malloc(m.get('malloc_env'))}; "
             f"median of {m['repeats']} interleaved repetitions after {m['warmup']} warm-up"]
    if m.get("sliding_window_case"):
        lines.append(f"sliding window: case {m['sliding_window_case']} {tuple(m['sliding_window_case_shape'])}, "
                     f"{m['sliding_window_tiles']} tiles at step {m['sliding_window_step_size']}, "
                     f"{m['sliding_window_repeats']} repetition(s)")
    lines.append("")
    cols = [("params", "params", lambda v: f"{v / 1e6:.2f}M"),
            ("GFLOPs", "gflops", lambda v: f"{v:.2f}"),
            ("GMACs", "gmacs", lambda v: f"{v:.2f}"),
            ("fwd bs 1", "inference_bs1_s", _fmt_s),
            (f"fwd bs {m['batch_size']}", "inference_s", _fmt_s),
            (f"train step bs {m['batch_size']}", "train_step_s", _fmt_s),
            ("peak mem train", "peak_memory_mb", lambda v: f"{v:.0f} MB"),
            ("sliding window", "sliding_window_s", _fmt_s),
            ("sliding window + mirror", "sliding_window_mirror_s", _fmt_s)]
    cols = [c for c in cols if any(r.get(c[1]) is not None for r in rows)]
    table_rows = []
    for r in rows:
        cells = [r["trainer"]]
        for _title, key, fmt in cols:
            v = r.get(key)
            cell = "–" if v is None else fmt(v)
            if r is not ref and v is not None:
                cell += f" ({ratio(v, ref.get(key))})"
            cells.append(cell)
        table_rows.append(cells)
    lines.append(markdown_table(["trainer"] + [c[0] for c in cols], table_rows))
    lines.append("")
    lines.append(f"(ratios vs {ref['trainer']}; FLOPs: torch FlopCounterMode, batch 1, 2 FLOPs per MAC; "
                 f"params include training-only heads; peak memory: {m['peak_memory_method'] or 'not measured'})")
    return "\n".join(lines) + "\n"
