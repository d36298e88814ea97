"""What the trainers read from an nnU-Net configuration beyond its patch size and pooling strides."""
from __future__ import annotations

from typing import List

from torch import nn


def plan_kernel_sizes(configuration_manager) -> List[List[int]]:
    """The plan's per-stage conv kernel sizes (``architecture.arch_kwargs.kernel_sizes``); the networks only read
    which axes have a kernel of 1 (anisotropic plans)."""
    return configuration_manager.network_arch_init_kwargs["kernel_sizes"]


def freeze_unused_heads(net: nn.Module, enable_deep_supervision: bool) -> nn.Module:
    """Without deep supervision the network's other heads receive no gradient; nnU-Net wraps the network in DDP
    without ``find_unused_parameters``, which fails on such parameters, so they are frozen (they stay in the state
    dict and a checkpoint trained either way loads)."""
    if not enable_deep_supervision:
        net.deep_supervision_heads().requires_grad_(False)
    return net
