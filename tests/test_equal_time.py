"""Wall-clock budgets (``WallClockBudget``, the ``*_cpu45min`` trainers) and the equal-time benchmark that lets such
trainers take turns on one machine."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunetv2_lgms.benchmark import equal_time
from nnunetv2_lgms.trainers import budget as budget_module
from nnunetv2_lgms.trainers.budget import WallClockBudget


class _Clock:
    """``time.perf_counter`` / ``process_time`` that advance only when a step 'takes' time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Logger:
    def __init__(self):
        self.values = {}

    def log(self, key, value, epoch):
        self.values.setdefault(key, {})[epoch] = value


class _FakeTrainer:
    """The parts of nnUNetTrainer a budget uses; each training step takes ``step_s`` seconds of the fake clock."""

    def __init__(self, plans, configuration, fold, dataset_json, device):
        self.fake_clock, self.step_s, self.output_folder = None, 10.0, plans["folder"]
        self.num_epochs, self.current_epoch = 1000, 0
        self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 250, 50
        self.network = torch.nn.Linear(2, 2)
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=0.01)
        self.lr_scheduler = PolyLRScheduler(self.optimizer, 0.01, self.num_epochs)
        self.logger, self.steps, self.local_rank, self.is_ddp = _Logger(), 0, 0, False
        self.my_init_kwargs, self.inference_allowed_mirroring_axes = {}, (0, 1)
        self.dataloader_train = self.dataloader_val = iter(int, 1)

    def print_to_log_file(self, *args, **kwargs):
        pass

    def on_epoch_start(self):
        pass

    def on_train_epoch_start(self):
        self.lr_scheduler.step(self.current_epoch)

    def train_step(self, batch):
        self.fake_clock.now += self.step_s
        self.steps += 1
        return {"loss": 0.0}

    def on_train_epoch_end(self, outputs):
        pass

    def on_validation_epoch_start(self):
        pass

    def validation_step(self, batch):
        return {}

    def on_validation_epoch_end(self, outputs):
        pass

    def on_epoch_end(self):
        self.current_epoch += 1


class _Budgeted(WallClockBudget, _FakeTrainer):
    budget_minutes, snapshot_minutes = 10.0, 2.0
    iterations_per_epoch, val_iterations_per_epoch = 4, 1


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(budget_module.time, "perf_counter", clock)
    monkeypatch.setattr(budget_module.time, "process_time", clock)
    t = _Budgeted({"folder": str(tmp_path)}, "2d", 0, {}, torch.device("cpu"))
    t.fake_clock = clock
    return t


def test_budget_stops_after_the_step_that_spends_it(trainer):
    while not trainer.budget_spent():
        trainer.run_epoch()
    assert trainer.steps == 60  # 600 s of 10 s steps
    assert trainer.seconds_used == pytest.approx(600.0)
    assert sum(e["iterations"] for e in trainer.epoch_times) == 60 and trainer.epoch_times[-1]["wall_s"] == 600.0


def test_schedule_is_stretched_over_the_budget(trainer):
    lrs = []
    while not trainer.budget_spent():
        trainer.run_epoch()
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    # epoch e starts after 40 e seconds: nnU-Net's poly schedule at epoch 1000 * 40 e / 600
    expected = [0.01 * (1 - int(40 * e / 600 * 1000) / 1000) ** 0.9 for e in range(len(lrs))]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] < 0.1 * lrs[0]  # decayed when the budget ends


def test_snapshots_every_interval_and_at_the_end(trainer):
    while not trainer.budget_spent():
        trainer.run_epoch()
    names = sorted(p.name for p in Path(trainer.output_folder).glob("checkpoint_t*s.pth"))
    # epochs end every 40 s; the 120 s marks are crossed at 120, 240, 360, 480 and the budget ends at 600
    assert names == [f"checkpoint_t{s:05d}s.pth" for s in (120, 240, 360, 480, 600)]
    snapshot = torch.load(Path(trainer.output_folder) / names[0], weights_only=False)
    assert snapshot["budget_seconds_used"] == 120.0 and set(snapshot["network_weights"]) == {"weight", "bias"}
    assert json.loads((Path(trainer.output_folder) / "clock.json").read_text()) == trainer.epoch_times


def test_turns_alternate_step_by_step(tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(budget_module.time, "perf_counter", clock)
    monkeypatch.setattr(budget_module.time, "process_time", clock)
    order = []

    trainers = []
    for folder, step in (("a", 10.0), ("b", 5.0)):
        (tmp_path / folder).mkdir()
        t = _Budgeted({"folder": str(tmp_path / folder)}, "2d", 0, {}, torch.device("cpu"))
        t.fake_clock, t.step_s = clock, step
        t.on_train_start = lambda: None
        t.on_train_end = lambda: None
        original = t.train_step
        t.train_step = (lambda orig, name: lambda batch: (order.append(name), orig(batch))[1])(original, folder)
        trainers.append(t)
    equal_time.train_in_turns(trainers, log=lambda m: None)
    assert order[:6] == ["a", "b", "a", "b", "a", "b"]
    assert trainers[0].steps == 60 and trainers[1].steps == 120  # each spent its own 600 s
    assert all(t.seconds_used == pytest.approx(600.0) for t in trainers)


def test_trainers_without_a_budget_are_refused(trainer_env):
    with pytest.raises(equal_time.BenchmarkError, match="no wall-clock budget"):
        equal_time.build_trainers("999", "2d", "0", ["nnUNetTrainerLGMSNet"], "cpu")


@pytest.mark.slow
def test_equal_time_end_to_end(e2e_project_2d, monkeypatch, tmp_path):
    """Two budget trainers take turns on the synthetic 2D dataset for a few seconds each; their snapshots are scored
    on the fold's validation cases and the report is written."""
    project = e2e_project_2d
    for key, value in dict(project.env, nnUNet_n_proc_DA="0").items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "report"
    rc = equal_time.main(["-d", str(project.dataset_id), "-c", "2d", "-f", "0", "-tr",
                          "nnUNetTrainerBaseline_cpu45min", "nnUNetTrainerLGMSNet_cpu45min",
                          "--budget-minutes", "0.1", "--snapshot-minutes", "0.05", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "equal_time.json").read_text())
    assert {s["trainer"] for s in report["snapshots"]} == {"nnUNetTrainerBaseline_cpu45min",
                                                            "nnUNetTrainerLGMSNet_cpu45min"}
    assert all(0.0 <= s["dice"] <= 1.0 and s["n_cases"] > 0 for s in report["snapshots"])
    for name, final in report["final"].items():
        assert final["steps"] >= 1 and final["dice"] is not None
    assert (out / "equal_time.png").is_file() and "validation Dice" in (out / "equal_time.md").read_text()
