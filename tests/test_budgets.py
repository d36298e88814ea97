"""The trainers' budget variants change only the budget: epochs, iterations and, for the CPU-benchmark protocol, the
batch size that nnU-Net's initialize() uses (and records in the trainer's plans)."""

import pytest

from nnunetv2_lgms.trainers import (nnUNetTrainerBaseline_cpubench, nnUNetTrainerBaseline_cpubench3d,
                                    nnUNetTrainerBaseline_smoke, nnUNetTrainerGLIMS_cpubench,
                                    nnUNetTrainerLGMSNet_cpubench, nnUNetTrainerLGMSNet_cpubench3d,
                                    nnUNetTrainerLGMSNet_demo)
import plans_utils

DATASET_JSON = {"channel_names": {"0": "x"}, "labels": {"background": 0, "a": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}


def make(cls, plan_batch=5):
    return plans_utils.make_trainer(cls, DATASET_JSON, batch_size=plan_batch)


@pytest.mark.parametrize("cls, budget", [
    (nnUNetTrainerBaseline_cpubench, (10, 20, 4, 8)),
    (nnUNetTrainerLGMSNet_cpubench, (10, 20, 4, 8)),
    (nnUNetTrainerGLIMS_cpubench, (10, 20, 4, 8)),
    (nnUNetTrainerBaseline_cpubench3d, (10, 12, 4, 2)),
    (nnUNetTrainerLGMSNet_cpubench3d, (10, 12, 4, 2)),
    (nnUNetTrainerBaseline_smoke, (2, 2, 1, 5)),
    (nnUNetTrainerLGMSNet_demo, (8, 12, 2, 5)),
])
def test_budget_sets_epochs_iterations_and_batch(trainer_env, cls, budget):
    trainer = make(cls, plan_batch=5)
    trainer._set_batch_size_and_oversample()  # what initialize() calls
    got = (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch,
           trainer.batch_size)
    assert got == budget
    # the plans the trainer saves with its checkpoint/plans.json carry the batch that was used
    assert trainer.plans_manager.plans["configurations"]["cfg"]["batch_size"] == budget[3]
