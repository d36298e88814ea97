"""End to end through the stock nnUNetv2_plan_and_preprocess / nnUNetv2_train (-device cpu) / nnUNetv2_predict on
tiny synthetic datasets, with GLIMS found via nnUNet_extTrainer."""
from __future__ import annotations

import pytest

from e2e_utils import assert_predictions, assert_trained

pytestmark = pytest.mark.slow
TRAINER = "nnUNetTrainerGLIMS_smoke"


def test_2d_train_predict_and_resume(e2e_project_2d):
    project = e2e_project_2d
    fold = project.train(TRAINER)
    summary = assert_trained(fold)
    assert set(summary["mean"]) == {"1"}
    assert_predictions(project, project.predict(TRAINER), {0, 1})
    # --c on a finished run: nnU-Net loads checkpoint_final (AdamW + warm-up/cosine state) and redoes the validation
    mtime = (fold / "validation" / "summary.json").stat().st_mtime
    project.train(TRAINER, "0", "--c")
    assert (fold / "validation" / "summary.json").stat().st_mtime > mtime


def test_3d_fullres_anisotropic_train_predict(e2e_project_3d):
    project = e2e_project_3d
    assert_trained(project.train(TRAINER))
    assert_predictions(project, project.predict(TRAINER), {0, 1})
