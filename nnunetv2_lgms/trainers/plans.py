"""What the trainers read from an nnU-Net configuration beyond its patch size and pooling strides."""
from __future__ import annotations

from typing import List


def plan_kernel_sizes(configuration_manager) -> List[List[int]]:
    """The plan's per-stage conv kernel sizes (``architecture.arch_kwargs.kernel_sizes``); the networks only read
    which axes have a kernel of 1 (anisotropic plans)."""
    return configuration_manager.network_arch_init_kwargs["kernel_sizes"]
