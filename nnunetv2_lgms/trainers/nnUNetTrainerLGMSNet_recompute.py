"""LGMSNet whose blocks at the three finest resolution levels are recomputed in the backward instead of keeping
their activations (:func:`nnunetv2_lgms.acceleration.recompute.recompute`): less training memory for a longer step,
the same results and checkpoints as ``nnUNetTrainerLGMSNet``. Measured in ``results/memory/README.md``."""
from __future__ import annotations

from torch import nn

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_lgms.acceleration.recompute import DEFAULT_LEVELS, recompute
from nnunetv2_lgms.trainers.nnUNetTrainerLGMSNet import nnUNetTrainerLGMSNet

#: LGMSNet resolution levels whose blocks are recomputed (0 = full resolution)
RECOMPUTE_LEVELS = DEFAULT_LEVELS


class nnUNetTrainerLGMSNet_recompute(nnUNetTrainerLGMSNet):
    """:class:`nnUNetTrainerLGMSNet` (same recipe, same checkpoints) with levels 0-2 recomputed in the backward."""

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        net = nnUNetTrainerLGMSNet.build_network_architecture(plans_manager, configuration_manager,
                                                              num_input_channels, num_output_channels,
                                                              enable_deep_supervision)
        return recompute(net, levels=RECOMPUTE_LEVELS)
