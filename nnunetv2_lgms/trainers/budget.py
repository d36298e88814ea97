"""Short training budgets for smoke runs and the demo, in the style of nnU-Net's ``nnUNetTrainer_Xepochs``.

A variant lists :class:`TrainingBudget` first in its bases and sets the class attributes it changes; ``None`` keeps
nnU-Net's default (1000 epochs x 250 iterations, 50 validation iterations).
"""
from __future__ import annotations

from typing import Optional

import torch


class TrainingBudget:
    epochs: Optional[int] = None
    iterations_per_epoch: Optional[int] = None
    val_iterations_per_epoch: Optional[int] = None

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


class SmokeBudget(TrainingBudget):
    """2 epochs x 2 iterations: checks that training, checkpointing and validation run (CPU tests, CI)."""
    epochs, iterations_per_epoch, val_iterations_per_epoch = 2, 2, 1


class DemoBudget(TrainingBudget):
    """The budget of ``nnunetv2_lgms demo``: enough for a synthetic task to be learnt on 2 CPU cores."""
    epochs, iterations_per_epoch, val_iterations_per_epoch = 8, 12, 2
