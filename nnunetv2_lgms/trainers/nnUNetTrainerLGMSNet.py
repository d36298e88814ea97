"""nnU-Net trainers for LGMSNet: nnU-Net's default recipe (SGD, poly LR, DC+CE/BCE, deep supervision), only the
network changes. The network is the reference LGMSNet with :func:`~nnunetv2_lgms.acceleration.accelerate` applied
(``nnUNet_lgms_acceleration=none`` gives the plain reference)."""
from __future__ import annotations

from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_lgms.acceleration import accelerate
from nnunetv2_lgms.networks.lgmsnet import LGMSNet, lgmsnet_deep_supervision_scales
from nnunetv2_lgms.trainers.budget import (CPUBenchmarkBudget, CPUBenchmarkBudget3D, CPUEqualTimeBudget, DemoBudget,
                                           SmokeBudget, TrainingBudget)
from nnunetv2_lgms.trainers.plans import freeze_unused_heads, plan_kernel_sizes


class nnUNetTrainerLGMSNet(nnUNetTrainer):
    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        net = LGMSNet.from_plan(configuration_manager.patch_size, configuration_manager.pool_op_kernel_sizes,
                                plan_kernel_sizes(configuration_manager), num_input_channels, num_output_channels,
                                enable_deep_supervision)
        return accelerate(freeze_unused_heads(net, enable_deep_supervision))[0]

    def _get_deep_supervision_scales(self):
        # LGMSNet has 5 levels whatever the plan's stage count, hence its own scales (one per decoder output).
        if not self.enable_deep_supervision:
            return None
        return lgmsnet_deep_supervision_scales(self.configuration_manager.pool_op_kernel_sizes,
                                               len(self.configuration_manager.patch_size))


class nnUNetTrainerLGMSNet_1epoch(TrainingBudget, nnUNetTrainerLGMSNet):
    epochs = 1


class nnUNetTrainerLGMSNet_5epochs(TrainingBudget, nnUNetTrainerLGMSNet):
    epochs = 5


class nnUNetTrainerLGMSNet_10epochs(TrainingBudget, nnUNetTrainerLGMSNet):
    epochs = 10


class nnUNetTrainerLGMSNet_20epochs(TrainingBudget, nnUNetTrainerLGMSNet):
    epochs = 20


class nnUNetTrainerLGMSNet_50epochs(TrainingBudget, nnUNetTrainerLGMSNet):
    epochs = 50


class nnUNetTrainerLGMSNet_100epochs(TrainingBudget, nnUNetTrainerLGMSNet):
    epochs = 100


class nnUNetTrainerLGMSNet_250epochs(TrainingBudget, nnUNetTrainerLGMSNet):
    epochs = 250


class nnUNetTrainerLGMSNet_500epochs(TrainingBudget, nnUNetTrainerLGMSNet):
    epochs = 500


class nnUNetTrainerLGMSNet_smoke(SmokeBudget, nnUNetTrainerLGMSNet):
    pass


class nnUNetTrainerLGMSNet_demo(DemoBudget, nnUNetTrainerLGMSNet):
    pass


class nnUNetTrainerLGMSNet_cpubench(CPUBenchmarkBudget, nnUNetTrainerLGMSNet):
    pass


class nnUNetTrainerLGMSNet_cpubench3d(CPUBenchmarkBudget3D, nnUNetTrainerLGMSNet):
    pass


class nnUNetTrainerLGMSNet_cpu45min(CPUEqualTimeBudget, nnUNetTrainerLGMSNet):
    pass
