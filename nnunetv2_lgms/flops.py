"""FLOP counting with ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-accumulate; convolutions,
matmuls and attention; norms and activations are not counted).

What is counted is the architecture's arithmetic: a speed path that computes the same result with extra arithmetic
(LGMSNet's merged depthwise conv with zero-padded kernels) steps aside while :func:`count_flops` runs
(:func:`is_counting_flops`), so the count matches the reference implementations'.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count

_aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _addmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _conv_pointwise_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention uses here,
# nor oneDNN's fused conv + activation and the in-place addmm_ that the networks' CPU inference path calls
# (networks/cpu_inference.py); without these, such ops would count as zero on CPU.
_CUSTOM = {_aten.addmm_: _addmm_flop}
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[_aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
try:
    _CUSTOM[torch.ops.mkldnn._convolution_pointwise] = _conv_pointwise_flop
except (AttributeError, RuntimeError):
    pass


_counting_flops = False


def is_counting_flops() -> bool:
    """True inside :func:`count_flops`: modules then run their plain arithmetic."""
    return _counting_flops


@contextlib.contextmanager
def _plain_arithmetic():
    global _counting_flops
    previous, _counting_flops = _counting_flops, True
    try:
        yield
    finally:
        _counting_flops = previous


def count_flops(model: nn.Module, input_shape: Sequence[int], device: str = "cpu") -> int:
    """Forward FLOPs of ``model``'s architecture in eval mode for one input of ``input_shape`` (including the batch
    axis)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _plain_arithmetic(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            model(torch.zeros(*input_shape, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops()
