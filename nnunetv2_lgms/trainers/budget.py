"""Short training budgets for smoke runs and the demo, in the style of nnU-Net's ``nnUNetTrainer_Xepochs``.

A variant lists :class:`TrainingBudget` first in its bases and sets the class attributes it changes; ``None`` keeps
nnU-Net's default (1000 epochs x 250 iterations, 50 validation iterations, the plan's batch size).
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
from batchgenerators.utilities.file_and_folder_operations import join, save_json


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


class WallClockBudget(TrainingBudget):
    """Trains for ``budget_minutes`` of wall-clock time instead of a number of epochs, for equal-time comparisons.

    * The clock runs only inside the epochs (data loading, training steps, the online validation); start-up,
      snapshots, the final checkpoint and nnU-Net's final validation are not counted. The budget is checked after
      every training step, so a run ends at most one step (and the epoch's online validation) past it.
    * The trainer's own LR schedule is stretched over the budget: each epoch's LR is the one its schedule gives at
      epoch ``(time used / budget) * num_epochs``, so nnU-Net's poly decay (or GLIMS's warm-up and cosine) reaches
      its end when the budget does.
    * Every ``snapshot_minutes`` of budget a snapshot ``checkpoint_t<seconds>s.pth`` (the network's weights and what
      ``nnUNetPredictor`` needs) is written, for accuracy against time.
    * ``clock.json`` in the fold folder records the wall and CPU seconds of every epoch.

    An epoch is :meth:`begin_epoch`, :meth:`train_iteration` until it returns False, :meth:`end_epoch`, so that
    several such trainers can share a machine step by step (``python -m nnunetv2_lgms.benchmark.equal_time``): a
    load that comes and goes then falls on all of them alike.
    """

    budget_minutes: float = 45.0
    snapshot_minutes: Optional[float] = 5.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.seconds_used = 0.0
        self.cpu_seconds_used = 0.0
        self.epoch_times: list = []

    @property
    def budget_seconds(self) -> float:
        return 60.0 * self.budget_minutes

    def budget_spent(self) -> bool:
        return self.seconds_used >= self.budget_seconds

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        stretched = min(self.num_epochs - 1, int(self.seconds_used / self.budget_seconds * self.num_epochs))
        self.lr_scheduler.step(stretched)
        self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], self.current_epoch)
        self.print_to_log_file(f"Budget used: {self.seconds_used:.0f} of {self.budget_seconds:.0f} s, learning rate "
                               f"{self.optimizer.param_groups[0]['lr']:.5f} (schedule epoch {stretched})")

    @contextlib.contextmanager
    def _clock(self):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds_used += time.perf_counter() - wall
            self.cpu_seconds_used += time.process_time() - cpu

    def run_epoch(self) -> None:
        """One epoch of at most ``num_iterations_per_epoch`` steps, ending early when the budget is spent."""
        self.begin_epoch()
        while self.train_iteration():
            pass
        self.end_epoch()

    def begin_epoch(self) -> None:
        with self._clock():
            self._epoch_start_seconds = self.seconds_used
            self.on_epoch_start()
            self.on_train_epoch_start()
            self._train_outputs = []

    def train_iteration(self) -> bool:
        """One training step; whether the epoch goes on (steps left and budget left)."""
        with self._clock():
            self._train_outputs.append(self.train_step(next(self.dataloader_train)))
        return len(self._train_outputs) < self.num_iterations_per_epoch and not self.budget_spent()

    def end_epoch(self) -> None:
        with self._clock():
            self.on_train_epoch_end(self._train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                self.on_validation_epoch_end([self.validation_step(next(self.dataloader_val))
                                              for _ in range(self.num_val_iterations_per_epoch)])
            self.on_epoch_end()
        self.epoch_times.append({"epoch": self.current_epoch - 1, "iterations": len(self._train_outputs),
                           "wall_s": round(self.seconds_used, 2), "cpu_s": round(self.cpu_seconds_used, 2)})
        self._snapshot_crossed(self._epoch_start_seconds)
        save_json(self.epoch_times, join(self.output_folder, "clock.json"))

    def _snapshot_crossed(self, before: float) -> None:
        if not self.snapshot_minutes:
            return
        every = 60.0 * self.snapshot_minutes
        if int(self.seconds_used // every) > int(before // every) or self.budget_spent():
            self.save_snapshot(join(self.output_folder, f"checkpoint_t{int(round(self.seconds_used)):05d}s.pth"))

    def save_snapshot(self, filename: str) -> None:
        """The network's weights with what ``nnUNetPredictor.initialize_from_trained_model_folder`` reads."""
        if self.local_rank != 0:
            return
        network = self.network.module if self.is_ddp else self.network
        network = getattr(network, "_orig_mod", network)
        torch.save({"network_weights": network.state_dict(), "init_args": self.my_init_kwargs,
                    "trainer_name": self.__class__.__name__, "current_epoch": self.current_epoch,
                    "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
                    "budget_seconds_used": self.seconds_used, "cpu_seconds_used": self.cpu_seconds_used}, filename)

    def run_training(self):
        self.on_train_start()
        while not self.budget_spent():
            self.run_epoch()
        self.on_train_end()


class CPUEqualTimeBudget(WallClockBudget):
    """The equal-time CPU comparison of ``results/``: 45 minutes, epochs of 10 iterations and 2 online-validation
    iterations (so that several trainers can take turns on one machine), a snapshot every 5 minutes."""
    budget_minutes, snapshot_minutes = 45.0, 5.0
    iterations_per_epoch, val_iterations_per_epoch = 10, 2
