"""Short training budgets for smoke runs and the demo, in the style of nnU-Net's ``nnUNetTrainer_Xepochs``.

A variant lists :class:`TrainingBudget` first in its bases and sets the class attributes it changes; ``None`` keeps
nnU-Net's default (1000 epochs x 250 iterations, 50 validation iterations, the plan's batch size).
"""
from __future__ import annotations

from typing import Optional

import torch


class TrainingBudget:
    epochs: Optional[int] = None
    iterations_per_epoch: Optional[int] = None
    val_iterations_per_epoch: Optional[int] = None
    batch_size: Optional[int] = None

    # nnU-Net records __init__ arguments by these exact parameter names; keep them.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.epochs is not None:
            self.num_epochs = self.epochs
        if self.iterations_per_epoch is not None:
            self.num_iterations_per_epoch = self.iterations_per_epoch
        if self.val_iterations_per_epoch is not None:
            self.num_val_iterations_per_epoch = self.val_iterations_per_epoch
        if self.batch_size is not None:
            # initialize() reads the batch size from the configuration manager; the plans dict is what the trainer
            # saves (plans.json, checkpoints), so it records the batch that was used
            self.configuration_manager.configuration["batch_size"] = self.batch_size
            self.plans_manager.plans["configurations"][configuration]["batch_size"] = self.batch_size


class SmokeBudget(TrainingBudget):
    """2 epochs x 2 iterations: checks that training, checkpointing and validation run (CPU tests, CI)."""
    epochs, iterations_per_epoch, val_iterations_per_epoch = 2, 2, 1


class DemoBudget(TrainingBudget):
    """The budget of ``nnunetv2_lgms demo``: enough for a synthetic task to be learnt on 2 CPU cores."""
    epochs, iterations_per_epoch, val_iterations_per_epoch = 8, 12, 2



class CPUBenchmarkBudget(TrainingBudget):
    """The reduced 2D protocol of the committed CPU benchmarks in ``results/``: 10 epochs x 20 iterations at batch 8
    (1600 samples), 4 validation iterations. Sized so that the slowest network (GLIMS) trains in under ~20 min on
    2 CPU cores; far from converged, and the same for every trainer."""
    epochs, iterations_per_epoch, val_iterations_per_epoch, batch_size = 10, 20, 4, 8


class CPUBenchmarkBudget3D(TrainingBudget):
    """The reduced 3D protocol of the committed CPU benchmarks: 10 epochs x 12 iterations at batch 2, 4 validation
    iterations (3D steps cost ~10x more on CPU)."""
    epochs, iterations_per_epoch, val_iterations_per_epoch, batch_size = 10, 12, 4, 2
