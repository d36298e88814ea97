"""Shared pieces of the end-to-end tests: a synthetic dataset in a private nnU-Net root, planned and preprocessed
with the stock command, and helpers to train/predict with the stock commands on CPU."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from nnunetv2_lgms.nnunet_runner import nnunet_env, run_nnunet
from nnunetv2_lgms.synthetic import make_dataset


class NnunetProject:
    """One nnU-Net root (raw/preprocessed/results) holding one synthetic dataset."""

    def __init__(self, root: Path, dataset_id: int, dim: int, configuration: str, size: Sequence[int],
                 kind: str = "labels", ignore_label: bool = False, num_train: int = 8, num_test: int = 2):
        self.root, self.dataset_id, self.configuration, self.dim = root, dataset_id, configuration, dim
        self.env = nnunet_env(root, "cpu")
        self.env["nnUNet_def_n_proc"] = "1"
        self.raw = make_dataset(self.env["nnUNet_raw"], dataset_id, dim=dim, num_train=num_train,
                                num_test=num_test, size=size, kind=kind, ignore_label=ignore_label)
        # nnUNet_n_proc_DA=0 must not reach the planner: it calls torch.set_num_threads(n_proc_DA)
        run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", configuration, "-np", "1",
                    "--verify_dataset_integrity"], self.env, root / "logs" / "plan.log")

    def train(self, trainer: str, fold: str = "0", *extra: str) -> Path:
        env = dict(self.env, nnUNet_n_proc_DA="0")
        run_nnunet(["nnUNetv2_train", self.dataset_id, self.configuration, fold, "-tr", trainer, "-device", "cpu",
                    *extra], env, self.root / "logs" / f"train_{trainer}.log")
        return (Path(self.env["nnUNet_results"]) / self.raw.name / f"{trainer}__nnUNetPlans__{self.configuration}"
                / f"fold_{fold}")

    def predict(self, trainer: str, fold: str = "0") -> Path:
        out = self.root / "predictions" / trainer
        run_nnunet(["nnUNetv2_predict", "-i", self.raw / "imagesTs", "-o", out, "-d", self.dataset_id,
                    "-c", self.configuration, "-f", fold, "-tr", trainer, "-device", "cpu", "-npp", "1",
                    "-nps", "1", "--disable_progress_bar"], self.env, self.root / "logs" / f"predict_{trainer}.log")
        return out

    def ending(self) -> str:
        return ".png" if self.dim == 2 else ".nii.gz"

    def test_cases(self):
        return sorted(p.name[: -len("_0000" + self.ending())] for p in (self.raw / "imagesTs").iterdir())


def read_array(path: Path) -> np.ndarray:
    if path.suffix == ".png":
        from PIL import Image
        return np.asarray(Image.open(path))
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def assert_trained(fold_dir: Path) -> dict:
    import json
    assert (fold_dir / "checkpoint_final.pth").is_file(), sorted(p.name for p in fold_dir.parent.rglob("*"))
    summary = fold_dir / "validation" / "summary.json"
    assert summary.is_file()
    return json.loads(summary.read_text())


def assert_predictions(project: NnunetProject, pred_dir: Path, valid_labels: set) -> None:
    cases = project.test_cases()
    assert cases
    for case in cases:
        image = read_array(project.raw / "imagesTs" / f"{case}_0000{project.ending()}")
        pred = read_array(pred_dir / f"{case}{project.ending()}")
        spatial = image.shape[:2] if project.dim == 2 else image.shape  # 2D PNGs are (H, W, RGB)
        assert pred.shape == spatial, (case, pred.shape, spatial)
        assert set(np.unique(pred).tolist()) <= valid_labels, (case, np.unique(pred))
