"""The trainers' networks learn: a few dozen of nnU-Net's own training steps (``nnUNetTrainer.train_step``: the
trainer's loss from ``_build_loss`` with deep supervision, its optimiser, gradient clipping at 12) take each network
from random weights to a held-out foreground Dice that a network predicting background only (Dice 0) or foreground
everywhere cannot reach. nnU-Net's own network (``nnUNetTrainer.build_network_architecture``) runs the same protocol
as a reference point.

* synthetic: bright discs (+2) on N(0, 1) noise, 1 channel, 32x32; 48 training / 16 held-out images, 60 steps of
  4. Threshold 0.72: predicting foreground everywhere scores 0.26, the best single intensity threshold per pixel
  0.68 (a 3x3 mean then a threshold: 0.94), so passing takes some use of the neighbourhood; the networks reached
  0.80 (GLIMS) to 0.95 in trial runs on the development machine.
* Kvasir-SEG: the first 80 cases (sorted by name) of ``../shared/data/Kvasir-SEG``, RGB resized to 48x48,
  40 training / 40 held-out, 80 steps of 4 (skipped where the folder is absent). Threshold 0.33: predicting
  foreground everywhere scores 0.24; the networks reached 0.37-0.44 in trial runs on the development machine.

The learning rate follows the trainer's own schedule compressed to the steps (one step per "epoch": nnU-Net's poly
decay for nnU-Net and LGMSNet, GLIMS's 5 % warm-up then cosine), so the weights settle by the end, as at the end of
a real run; at a constant rate LGMSNet's BatchNorm running statistics lag its weights and its eval-mode Dice after a
few dozen steps swings between 0.0 and 0.4 (its train-mode predictions do not).

One check, :func:`check_dice`, decides every case, also the tests that show it rejects background-only and
all-foreground predictions. Everything is seeded and runs on one torch thread.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from plans_utils import trainer_plans

from nnunetv2_lgms.trainers import nnUNetTrainerGLIMS, nnUNetTrainerLGMSNet

KVASIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "Kvasir-SEG"
TRAINERS = {"nnUNet": nnUNetTrainer, "LGMSNet": nnUNetTrainerLGMSNet, "GLIMS": nnUNetTrainerGLIMS}

#: held-out foreground Dice every network must reach (and predicting everything foreground does not)
SYNTHETIC_DICE = 0.72
KVASIR_DICE = 0.33
SYNTHETIC_STEPS, KVASIR_STEPS, BATCH = 60, 80, 4
KVASIR_CASES, KVASIR_TRAIN, KVASIR_SIZE = 80, 40, 48


def check_dice(pred: torch.Tensor, target: torch.Tensor, threshold: float):
    """(passed, dice): foreground Dice of label maps ``pred`` against ``target`` pooled over all images (2 |P and T|
    / (|P| + |T|)), and whether it reaches ``threshold``. An empty prediction scores 0."""
    p, t = pred.bool(), target.bool()
    denominator = int(p.sum() + t.sum())
    dice = 2.0 * int((p & t).sum()) / denominator if denominator else 1.0
    return dice >= threshold, dice


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test of this module on one torch thread."""


# ---------------------------------------------------------------------------------------------------------- data

def synthetic_blobs(n: int, size: int = 32, seed: int = 0):
    """``n`` images (n, 1, size, size): N(0, 1) noise plus 2 inside 1-3 discs of radius 3-7; labels (n, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            r = float(torch.randint(3, 8, (1,), generator=g))
            cy, cx = (torch.rand(2, generator=g) * (size - 2 * r) + r).tolist()
            labels[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    images = torch.randn(n, 1, size, size, generator=g) + 2.0 * labels[:, None].float()
    return images, labels


def kvasir(n: int = KVASIR_CASES, size: int = KVASIR_SIZE):
    """The first ``n`` Kvasir-SEG cases by name: z-scored RGB (n, 3, size, size) and masks (n, size, size)."""
    from PIL import Image

    names = sorted(p.name for p in (KVASIR / "images").iterdir())[:n]
    images, masks = [], []
    for name in names:
        image = Image.open(KVASIR / "images" / name).convert("RGB").resize((size, size), Image.BILINEAR)
        mask = Image.open(KVASIR / "masks" / name).convert("L").resize((size, size), Image.BILINEAR)
        images.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1))
        masks.append(np.asarray(mask) >= 128)  # JPEG masks: threshold the grey levels
    images, masks = torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)).long()
    mean, std = images.mean(dim=(0, 2, 3), keepdim=True), images.std(dim=(0, 2, 3), keepdim=True)
    return (images - mean) / std, masks


# ------------------------------------------------------------------------------------------------------ training

def make_trainer(name: str, size: int, channels: int, steps: int):
    """The trainer ``name`` on a hand-written 2D plan (patch ``size``, 4 poolings), CPU, its network built through
    its ``build_network_architecture`` with deep supervision, and ``network``, ``optimizer`` (with its learning-rate
    schedule over ``steps`` epochs) and ``loss`` set as ``nnUNetTrainer.initialize`` sets them."""
    cls = TRAINERS[name]
    plans = trainer_plans((size, size), [[1, 1]] + [[2, 2]] * 4, [[3, 3]] * 5, BATCH)
    dataset_json = {"channel_names": {str(c): f"c{c}" for c in range(channels)},
                    "labels": {"background": 0, "foreground": 1}, "numTraining": 1, "file_ending": ".png"}
    trainer = cls(plans, "cfg", 0, dataset_json, torch.device("cpu"))
    trainer.num_epochs = steps  # the schedule runs its course over the steps (one step per "epoch")
    torch.manual_seed(0)
    trainer.network = cls.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                     channels, trainer.label_manager.num_segmentation_heads,
                                                     trainer.enable_deep_supervision)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    return trainer


def ds_targets(trainer, labels: torch.Tensor):
    """Targets for each deep-supervision output, as nnU-Net's DownsampleSegForDSTransform makes them."""
    seg = labels[:, None].float()
    return [torch.nn.functional.interpolate(seg, [round(s * k) for s, k in zip(seg.shape[2:], scale)],
                                            mode="nearest-exact") for scale in trainer._get_deep_supervision_scales()]


def train_and_predict(name: str, images, labels, n_train: int, steps: int, seed: int = 0) -> torch.Tensor:
    """``steps`` nnU-Net training steps of ``BATCH`` random training images; label maps of the held-out images."""
    trainer = make_trainer(name, images.shape[-1], images.shape[1], steps)
    trainer.network.train()
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        trainer.lr_scheduler.step(step)  # as on_train_epoch_start does
        idx = torch.randint(0, n_train, (BATCH,), generator=g)
        trainer.train_step({"data": images[idx], "target": ds_targets(trainer, labels[idx])})
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    with torch.no_grad():
        return trainer.network(images[n_train:]).argmax(1)


# --------------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", TRAINERS)
def test_learns_synthetic_blobs_to_dice_0_72_in_60_steps(trainer_env, name):
    images, labels = synthetic_blobs(64)
    passed, dice = check_dice(train_and_predict(name, images, labels, 48, SYNTHETIC_STEPS), labels[48:],
                              SYNTHETIC_DICE)
    print(f"{name}: synthetic held-out Dice {dice:.3f}")
    assert passed, f"{name}: held-out Dice {dice:.3f} < {SYNTHETIC_DICE} after {SYNTHETIC_STEPS} steps"


@pytest.mark.skipif(not KVASIR.is_dir(), reason=f"{KVASIR} absent (real-data sample of ../shared)")
@pytest.mark.parametrize("name", TRAINERS)
def test_learns_kvasir_sample_to_dice_0_33_in_80_steps(trainer_env, name):
    images, labels = kvasir()
    passed, dice = check_dice(train_and_predict(name, images, labels, KVASIR_TRAIN, KVASIR_STEPS),
                              labels[KVASIR_TRAIN:], KVASIR_DICE)
    print(f"{name}: Kvasir held-out Dice {dice:.3f}")
    assert passed, f"{name}: held-out Dice {dice:.3f} < {KVASIR_DICE} after {KVASIR_STEPS} steps"


def test_check_rejects_background_only_and_all_foreground_predictions():
    _, labels = synthetic_blobs(64)
    cases = [(labels[48:], SYNTHETIC_DICE)]
    if KVASIR.is_dir():
        cases.append((kvasir()[1][KVASIR_TRAIN:], KVASIR_DICE))
    for target, threshold in cases:
        assert check_dice(target, target, threshold) == (True, 1.0)
        assert check_dice(torch.zeros_like(target), target, threshold) == (False, 0.0)
        passed, dice = check_dice(torch.ones_like(target), target, threshold)
        assert not passed and 0 < dice < threshold - 0.05, dice
