"""nnU-Net trainers for GLIMS (arXiv 2404.17854) with the official optimiser.

Recipe (official ``main.py`` where it has one, nnU-Net otherwise):

* **Optimiser**: AdamW, lr 1e-3, weight decay 1e-5 (official), default betas.
* **LR schedule**: linear warm-up then cosine annealing to 0, per epoch (official "cosine_anneal"). The official
  warm-up is a fixed 100 epochs (of 100 by default, 500 in a comment) of its own, dataset-length epochs. nnU-Net
  epochs are 250 iterations and budgets vary (1 to 1000 epochs), so the warm-up here is a fixed fraction,
  ``warmup_fraction`` = 5 % of ``num_epochs`` (at least 1 epoch): 50 of nnU-Net's 1000 epochs, the same as nnU-Net's
  own warm-up trainers (``nnUNetTrainer_warmup``, Primus). The warm-up starts at ``lr / W`` in epoch 0 (not at 0
  as MONAI's scheduler does), so no epoch is spent at lr 0. The LR is a closed-form function of the epoch, so
  nnU-Net's ``--c`` resume (``lr_scheduler.step(current_epoch)``) lands on the right value.
* **Loss**: nnU-Net's (DC+CE, or DC+BCE for region datasets), with deep supervision on GLIMS's four heads plus an
  auxiliary head that nnU-Net weights 0 (see :mod:`nnunetv2_lgms.networks.glims`), i.e. GLIMS's own 1, 1/2, 1/4,
  1/8 weighting. Everything else (data augmentation, batch size, patch size, 250 iterations x 1000 epochs, gradient
  clipping at 12, AMP on CUDA) is nnU-Net's.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import _LRScheduler

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_lgms.acceleration import accelerate
from nnunetv2_lgms.networks.glims import GLIMS, glims_deep_supervision_scales
from nnunetv2_lgms.trainers.budget import (CPUBenchmarkBudget, CPUBenchmarkBudget3D, CPUEqualTimeBudget, DemoBudget,
                                           SmokeBudget, TrainingBudget)
from nnunetv2_lgms.trainers.plans import freeze_unused_heads, plan_kernel_sizes


class WarmupCosineLRScheduler(_LRScheduler):
    """Per-epoch LR: ``lr * (e + 1) / W`` for ``e < W``, then ``lr/2 * (1 + cos(pi (e - W) / (N - W)))``.

    ``step(e)`` sets the LR of epoch ``e`` directly (nnU-Net calls ``step(self.current_epoch)``); ``step()`` without
    an argument advances an internal counter, as nnU-Net's ``PolyLRScheduler`` does."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int, current_step: int = None):
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.max_steps = max_steps
        self.warmup_steps = max(0, min(warmup_steps, max_steps))
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return 0.5 * self.initial_lr * (1 + math.cos(math.pi * min(progress, 1.0)))

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        new_lr = self.lr_at(current_step)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


class nnUNetTrainerGLIMS(nnUNetTrainer):
    """GLIMS with the official AdamW + warm-up/cosine recipe (see the module docstring)."""

    warmup_fraction = 0.05

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.weight_decay = 1e-5

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        net = GLIMS.from_plan(configuration_manager.patch_size, configuration_manager.pool_op_kernel_sizes,
                              plan_kernel_sizes(configuration_manager), num_input_channels, num_output_channels,
                              enable_deep_supervision)
        return accelerate(freeze_unused_heads(net, enable_deep_supervision))[0]

    def _get_deep_supervision_scales(self):
        # GLIMS has 6 levels whatever the plan's stage count, hence its own scales (one per output, 5 outputs).
        if not self.enable_deep_supervision:
            return None
        return glims_deep_supervision_scales(self.configuration_manager.pool_op_kernel_sizes,
                                             len(self.configuration_manager.patch_size))

    @property
    def warmup_epochs(self) -> int:
        return max(1, round(self.warmup_fraction * self.num_epochs))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        lr_scheduler = WarmupCosineLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)
        return optimizer, lr_scheduler


class nnUNetTrainerGLIMS_1epoch(TrainingBudget, nnUNetTrainerGLIMS):
    epochs = 1


class nnUNetTrainerGLIMS_5epochs(TrainingBudget, nnUNetTrainerGLIMS):
    epochs = 5


class nnUNetTrainerGLIMS_10epochs(TrainingBudget, nnUNetTrainerGLIMS):
    epochs = 10


class nnUNetTrainerGLIMS_20epochs(TrainingBudget, nnUNetTrainerGLIMS):
    epochs = 20


class nnUNetTrainerGLIMS_50epochs(TrainingBudget, nnUNetTrainerGLIMS):
    epochs = 50


class nnUNetTrainerGLIMS_100epochs(TrainingBudget, nnUNetTrainerGLIMS):
    epochs = 100


class nnUNetTrainerGLIMS_250epochs(TrainingBudget, nnUNetTrainerGLIMS):
    epochs = 250


class nnUNetTrainerGLIMS_500epochs(TrainingBudget, nnUNetTrainerGLIMS):
    epochs = 500


class nnUNetTrainerGLIMS_smoke(SmokeBudget, nnUNetTrainerGLIMS):
    pass


class nnUNetTrainerGLIMS_demo(DemoBudget, nnUNetTrainerGLIMS):
    pass


class nnUNetTrainerGLIMS_cpubench(CPUBenchmarkBudget, nnUNetTrainerGLIMS):
    pass


class nnUNetTrainerGLIMS_cpubench3d(CPUBenchmarkBudget3D, nnUNetTrainerGLIMS):
    pass


class nnUNetTrainerGLIMS_cpu45min(CPUEqualTimeBudget, nnUNetTrainerGLIMS):
    pass
