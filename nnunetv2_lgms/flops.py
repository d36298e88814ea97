"""FLOP counting with ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-accumulate; convolutions,
matmuls and attention; norms and activations are not counted), on the plain reference network: what is reported is
the architecture's arithmetic, whatever kernels an accelerated copy would run."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from nnunetv2_lgms.acceleration import reference_copy

_aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention dispatches
# to; without this entry, attention would count as zero on CPU
_CUSTOM = {}
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[_aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop


def count_flops(model: nn.Module, input_shape: Sequence[int], device: str = "cpu") -> int:
    """Forward FLOPs of ``model``'s reference architecture in eval mode for one input of ``input_shape`` (including
    the batch axis)."""
    reference = reference_copy(model).eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        reference(torch.zeros(*input_shape, device=device))
    return counter.get_total_flops()
