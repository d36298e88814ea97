"""Activation recomputation: chosen blocks keep no activations for the backward and run their forward again there.

``recompute(net, levels=(0, 1, 2))`` swaps, in place, the class of each chosen module to a subclass (created once per
class) whose ``forward`` (and any ``forward_*`` method, which a parent may call instead) runs under
``torch.utils.checkpoint`` (non-reentrant). No module is added or removed, so parameters, buffers, hooks and the
state dict stay what they are, and a checkpoint trained with or without it loads either way. Without autograd
(validation, prediction) the blocks run their plain forward.

What a recomputed block keeps for the backward: its inputs (and whatever the modules around it keep). What it costs:
its forward runs twice in a training step. Results are unchanged (same loss and gradients; tested). BatchNorm running
statistics are updated once per step, as without recomputation: the forward run again in the backward restores them
afterwards (plain ``torch.utils.checkpoint`` would update them twice).

Which modules a level means, for :class:`~nnunetv2_lgms.networks.lgmsnet.LGMSNet` (level 0 = full resolution):

* level 0: ``encoder.stem``, ``encoder.stages.0``, ``decoder.ups.0``, ``decoder.stages.0``
* level ``l`` in 1-3: ``encoder.stages.l``, ``decoder.ups.l``, ``decoder.stages.l``
* level 4: ``encoder.stages.4`` (the bottleneck)

A block that is a plain ``nn.Sequential`` (``encoder.stages.0-2``, ``decoder.stages.2``) is recomputed layer by
layer: a parent may run such a container's layers itself instead of calling it.

Why levels 0-2 by default (``results/memory/README.md``): what a block re-creates in the backward lives at once on top
of everything still kept, and the decoder's level-0 block is the first one the backward reaches, so its own
activations set the peak whatever else is recomputed; recomputing levels 1 and 2 as well lowers what is kept under
it, at little extra time (they are 4x and 16x smaller in 2D, 8x and 64x in 3D).

Any other network: pass the module names, ``recompute(net, modules=["encoder.stages.0", ...])``.

Under ``torch.compile`` the blocks are checkpointed without the running-statistics guard (Dynamo does not take
context managers in a checkpointed region; AOTAutograd's recomputation does not repeat buffer updates anyway).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

#: the levels :func:`recompute` and ``nnUNetTrainerLGMSNet_recompute`` use by default
DEFAULT_LEVELS = (0, 1, 2)

#: original class -> its recomputing subclass
_SUBCLASSES: Dict[type, type] = {}
_FLAG = "_recompute_running"  # instance attribute: the block's own forward is running (no nested checkpoint)


def lgmsnet_level_modules(level: int) -> List[str]:
    """Names (as in ``named_modules``) of LGMSNet's blocks at resolution level ``level`` (0 = full resolution)."""
    if not 0 <= level <= 4:
        raise ValueError(f"LGMSNet has levels 0-4, got {level}")
    names = ["encoder.stem"] if level == 0 else []
    names.append(f"encoder.stages.{level}")
    if level < 4:
        names += [f"decoder.ups.{level}", f"decoder.stages.{level}"]
    return names


def level_modules(net: nn.Module, levels: Iterable[int]) -> List[str]:
    """The names of the modules :func:`recompute` picks for ``levels`` of ``net``."""
    from nnunetv2_lgms.networks.lgmsnet import LGMSNet

    if not isinstance(net, LGMSNet):
        raise TypeError(f"recompute(levels=...) knows LGMSNet's blocks, not {type(net).__name__}'s; pass "
                        f"modules=[names] instead")
    modules = dict(net.named_modules())
    names = []
    for level in sorted(set(levels)):
        for name in lgmsnet_level_modules(level):
            if type(modules.get(name)) is nn.Sequential:
                # a plain container: a parent may run its layers one by one instead of calling it (the CPU training
                # path's decoder does, to hand the leading FusionConv its input as parts), so each layer is a region
                names += [f"{name}.{child}" for child, _ in modules[name].named_children()]
            else:
                names.append(name)
    return names


def recompute(net: nn.Module, levels: Sequence[int] = DEFAULT_LEVELS,
              modules: Optional[Iterable[str]] = None) -> nn.Module:
    """Recompute the blocks of ``levels`` (or the modules named in ``modules``) of ``net`` in the backward instead
    of keeping their activations; in place, returns ``net``. Applying it twice changes nothing."""
    names = list(modules) if modules is not None else level_modules(net, levels)
    by_name = dict(net.named_modules())
    missing = [n for n in names if n not in by_name]
    if missing:
        raise KeyError(f"{type(net).__name__} has no module(s) {missing}")
    for name in names:
        module = by_name[name]
        module.__class__ = recomputing_class(type(module))
    return net


def undo_recompute(net: nn.Module) -> nn.Module:
    """Return every recomputed module of ``net`` to its class before :func:`recompute`; in place, returns ``net``."""
    for module in net.modules():
        if is_recomputing(type(module)):
            module.__class__ = type(module).__dict__["_recompute_base"]
    return net


def recomputed_modules(net: nn.Module) -> List[str]:
    """Names of the modules of ``net`` that :func:`recompute` swapped."""
    return [name for name, m in net.named_modules() if is_recomputing(type(m))]


def is_recomputing(cls: type) -> bool:
    return "_recompute_base" in cls.__dict__


def recomputing_class(cls: type) -> type:
    """The subclass of ``cls`` whose ``forward`` and ``forward_*`` methods run under a non-reentrant checkpoint
    (``cls`` itself if it already is one). No new parameters or buffers."""
    if is_recomputing(cls):
        return cls
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        namespace = {"__module__": __name__, "_recompute_base": cls,
                     "__doc__": f"{cls.__name__} whose forward is recomputed in the backward (see {__name__})."}
        for name in dir(cls):
            if name == "forward" or name.startswith("forward_"):
                method = getattr(cls, name)
                if callable(method) and not isinstance(method, type):
                    namespace[name] = _checkpointed(method)
        sub = type(f"Recomputed{cls.__name__}", (cls,), namespace)
        _SUBCLASSES[cls] = sub
    return sub


def _checkpointed(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if not torch.is_grad_enabled() or self.__dict__.get(_FLAG, False):
            return method(self, *args, **kwargs)
        if torch.compiler.is_compiling():
            return checkpoint(functools.partial(method, self), *args, use_reentrant=False, **kwargs)
        return checkpoint(functools.partial(_flagged, method, self), *args, use_reentrant=False,
                          context_fn=functools.partial(_contexts, self), **kwargs)

    return run


def _flagged(method, module, *args, **kwargs):
    """``method`` with the module marked as running, so that a ``forward_*`` it calls is not checkpointed again."""
    module.__dict__[_FLAG] = True
    try:
        return method(module, *args, **kwargs)
    finally:
        module.__dict__[_FLAG] = False


def _contexts(module: nn.Module):
    """``context_fn`` of the checkpoint: nothing around the forward, the running statistics kept around the
    recomputation."""
    return contextlib.nullcontext(), _KeepRunningStats(module)


class _KeepRunningStats:
    """Restores the running statistics of the norm layers in ``module`` (BatchNorm, InstanceNorm with
    ``track_running_stats``) on exit, also when the recomputation stops early."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved = []

    def __enter__(self):
        self.saved = [(buf, buf.detach().clone())
                      for m in self.module.modules()
                      if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training
                      for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []
        return False


__all__ = ["DEFAULT_LEVELS", "is_recomputing", "level_modules", "lgmsnet_level_modules", "recompute",
           "recomputed_modules", "recomputing_class", "undo_recompute"]
