"""``nnunetv2_lgms profile``, ``compare`` and ``evaluate-unseen`` (nnunetv2_lgms.benchmark).

Fast: no stock planning or training. A tiny 2D project is written by hand (synthetic raw data, a plans file shaped
like the planner's, one case preprocessed with nnU-Net's DefaultPreprocessor), checkpoints are saved in nnU-Net's
format from networks built by the trainers, and summary.json files are fabricated with hand-checked numbers."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_lgms.benchmark import stats
from nnunetv2_lgms.cli import main
from nnunetv2_lgms.synthetic import make_dataset

DATASET_ID = 990
CFG = "2d"


# ----------------------------------------------------------------------------------------------------------------
# a tiny nnU-Net project written by hand


def _plans(dataset_name: str) -> dict:
    strides = [[1, 1], [2, 2], [2, 2], [2, 2]]
    return {
        "dataset_name": dataset_name, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [999.0, 1.0, 1.0],
        "original_median_shape_after_transp": [1, 48, 64], "image_reader_writer": "NaturalImage2DIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {CFG: {
            "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [32, 32], "median_image_size_in_voxels": [48.0, 64.0], "spacing": [1.0, 1.0],
            "normalization_schemes": ["ZScoreNormalization"] * 3, "use_mask_for_norm": [False] * 3,
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"n_stages": 4, "features_per_stage": [8, 16, 32, 64],
                                "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * 4,
                                "strides": strides, "n_conv_per_stage": [2] * 4, "n_conv_per_stage_decoder": [2] * 3,
                                "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": True}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 110.0, "mean": 72.0, "median": 73.0, "min": 30.0, "percentile_00_5": 45.0,
                     "percentile_99_5": 103.0, "std": 11.0} for c in range(3)},
    }


def write_tiny_project(root: Path) -> Path:
    """nnUNet_raw/preprocessed/results with Dataset990 (2D RGB, 48x64, patch 32x32) and one preprocessed case."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw = make_dataset(root / "nnUNet_raw", DATASET_ID, dim=2, num_train=2, num_test=0, size=(48, 64))
    pre = root / "nnUNet_preprocessed" / raw.name
    (pre / "nnUNetPlans_2d").mkdir(parents=True)
    (root / "nnUNet_results").mkdir()
    shutil.copy(raw / "dataset.json", pre / "dataset.json")
    plans = _plans(raw.name)
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans, indent=1))
    pm = PlansManager(plans)
    DefaultPreprocessor(verbose=False).run_case_save(
        str(pre / "nnUNetPlans_2d" / "case_000"), [str(raw / "imagesTr" / "case_000_0000.png")],
        str(raw / "labelsTr" / "case_000.png"), pm, pm.get_configuration(CFG), str(raw / "dataset.json"))
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return write_tiny_project(tmp_path_factory.mktemp("benchmark"))


@pytest.fixture
def nnunet_env(project, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(project / var))
    monkeypatch.setenv("nnUNet_compile", "f")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)  # the commands must set it in-process
    return project


def _ctx():
    from nnunetv2_lgms.benchmark.models import load_plan_context
    return load_plan_context(DATASET_ID, CFG)


# ----------------------------------------------------------------------------------------------------------------
# aggregation units


def test_aggregate_folds_hand_numbers():
    agg = stats.aggregate_folds({0: 0.8, 1: 0.9, 2: 0.7}, [0, 1, 2])
    assert agg.mean == pytest.approx(0.8) and agg.std == pytest.approx(0.1)  # sample std (ddof=1)
    assert agg.folds == [0, 1, 2] and agg.missing == []
    assert stats.fmt_mean_std(agg) == "0.8000 ± 0.1000"


def test_aggregate_folds_lists_missing_and_nan_folds():
    agg = stats.aggregate_folds({0: 0.85, 1: 0.95, 3: float("nan")}, [0, 1, 2, 3, 4])
    assert agg.folds == [0, 1] and agg.missing == [2, 3, 4]
    assert agg.mean == pytest.approx(0.9) and agg.std == pytest.approx(0.1 / math.sqrt(2))
    one = stats.aggregate_folds({2: 0.5}, [0, 1, 2])
    assert (one.mean, one.std, one.missing) == (0.5, None, [0, 1])
    assert stats.fmt_mean_std(one) == "0.5000"
    assert stats.fmt_mean_std(stats.aggregate_folds({}, [0])) == "–"


def test_paired_wilcoxon_matches_scipy_and_hand_value():
    from scipy.stats import wilcoxon

    ref = {f"c{i}": v for i, v in enumerate([0.50, 0.60, 0.70, 0.55, 0.65, 0.75, 0.9])}
    diffs = [0.01, 0.02, -0.03, 0.04, 0.05, 0.06]
    other = {f"c{i}": ref[f"c{i}"] + d for i, d in enumerate(diffs)}
    other["only_here"] = 0.1  # unmatched cases are ignored, c6 exists only in ref
    t = stats.paired_wilcoxon(ref, other)
    assert t.n == 6
    # by hand: ranks of |d| are 1..6, W- = 3 (the -0.03), two-sided exact p = 2 * #{subsets of 1..6 with sum <= 3}
    # / 2^6 = 2 * 5 / 64
    assert t.statistic == 3
    assert t.p == pytest.approx(10 / 64)
    keys = [f"c{i}" for i in range(6)]
    expected = wilcoxon([other[k] for k in keys], [ref[k] for k in keys])
    assert t.p == pytest.approx(expected.pvalue) and t.statistic == pytest.approx(expected.statistic)
    assert t.mean_diff == pytest.approx(np.mean(diffs))


def test_paired_wilcoxon_too_few_pairs_and_nan():
    t = stats.paired_wilcoxon({"a": 0.5, "b": 0.6, "c": float("nan")}, {"a": 0.6, "b": 0.7, "c": 0.7})
    assert t.n == 2 and t.p is None and "too few pairs" in t.note
    assert stats.paired_wilcoxon({"a": 0.5}, {"b": 0.5}).note == "no matched cases"


def test_per_case_foreground_mean_skips_background_and_nan():
    m = {"0": {"Dice": 0.99}, "1": {"Dice": 0.5}, "2": {"Dice": float("nan")}, "(1, 2)": {"Dice": 0.7}}
    assert stats.per_case_foreground_mean(m) == pytest.approx(0.6)
    assert math.isnan(stats.per_case_foreground_mean({"1": {"Dice": float("nan")}}))


# ----------------------------------------------------------------------------------------------------------------
# compare on fabricated summary.json files

# per fold: (label 1 Dice, label 1 IoU, label 2 Dice, label 2 IoU); foreground mean = mean of the two labels
FOLD_MEANS = {
    "nnUNetTrainer": {0: (0.8, 0.6, 0.5, 0.4), 1: (0.9, 0.7, 0.6, 0.4), 2: (0.7, 0.8, 0.7, 0.4)},
    "nnUNetTrainerLGMSNet": {0: (0.85, 0.7, 0.55, 0.5), 1: (0.95, 0.8, 0.65, 0.5)},  # fold 2 missing
}
CASE_DICE_REF = [0.50, 0.60, 0.70, 0.55, 0.65, 0.75, 0.8, 0.85, 0.9]  # 3 cases per fold
CASE_DIFFS = [0.01, 0.02, -0.03, 0.04, 0.05, 0.06]  # LGMSNet - reference, folds 0 and 1


def _summary(fold_means, case_dice, case_names) -> dict:
    d1, i1, d2, i2 = fold_means
    per_case = [{"reference_file": f"/somewhere/gt_segmentations/{name}.png",
                 "prediction_file": f"/somewhere/validation/{name}.png",
                 "metrics": {"1": {"Dice": dice, "IoU": dice / 2}, "2": {"Dice": dice, "IoU": dice / 2}}}
                for name, dice in zip(case_names, case_dice)]
    return {"metric_per_case": per_case,
            "mean": {"1": {"Dice": d1, "IoU": i1}, "2": {"Dice": d2, "IoU": i2}},
            "foreground_mean": {"Dice": (d1 + d2) / 2, "IoU": (i1 + i2) / 2}}


def _fabricate_results(results: Path, dataset: str) -> None:
    labels = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumor": 2},
              "file_ending": ".png", "numTraining": 9}
    for trainer, folds in FOLD_MEANS.items():
        folder = results / dataset / f"{trainer}__nnUNetPlans__{CFG}"
        folder.mkdir(parents=True)
        (folder / "dataset.json").write_text(json.dumps(labels))
        for fold, means in folds.items():
            names = [f"case_{3 * fold + i}" for i in range(3)]
            dice = CASE_DICE_REF[3 * fold: 3 * fold + 3]
            if trainer != "nnUNetTrainer":
                dice = [d + CASE_DIFFS[3 * fold + i] for i, d in enumerate(dice)]
            val = folder / f"fold_{fold}" / "validation"
            val.mkdir(parents=True)
            (val / "summary.json").write_text(json.dumps(_summary(means, dice, names)))


def test_compare_writes_expected_tables(tmp_path, monkeypatch, capsys):
    results = tmp_path / "nnUNet_results"
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("nnUNet_results", str(results))
    dataset = "Dataset777_Fake"
    _fabricate_results(results, dataset)
    out = tmp_path / "cmp"
    assert main(["compare", "-d", "777", "-c", CFG, "-tr", "nnUNetTrainer", "nnUNetTrainerLGMSNet",
                 "-f", "0", "1", "2", "-o", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert md == capsys.readouterr().out.split("\nwritten: ")[0].rstrip("\n") + "\n"
    lines = md.splitlines()
    # hand-checked: reference folds (0.8, 0.9, 0.7) -> 0.8 ± 0.1; LGMSNet (0.85, 0.95) -> 0.9 ± 0.1/sqrt(2)
    assert "| nnUNetTrainer | liver (1) | 0.8000 ± 0.1000 | 0.7000 ± 0.1000 | 3/3 | – |" in lines
    assert "| nnUNetTrainer | tumor (2) | 0.6000 ± 0.1000 | 0.4000 ± 0.0000 | 3/3 | – |" in lines
    # foreground means per fold 0.65, 0.75, 0.70 -> 0.70 ± 0.05; IoU 0.5, 0.55, 0.6 -> 0.55 ± 0.05
    assert "| nnUNetTrainer | foreground mean | 0.7000 ± 0.0500 | 0.5500 ± 0.0500 | 3/3 | – |" in lines
    assert "| nnUNetTrainerLGMSNet | liver (1) | 0.9000 ± 0.0707 | 0.7500 ± 0.0707 | 2/3 | 2 |" in lines
    assert "| nnUNetTrainerLGMSNet | foreground mean | 0.7500 ± 0.0707 | 0.6250 ± 0.0354 | 2/3 | 2 |" in lines
    assert "| nnUNetTrainerLGMSNet | 0.7000 | 0.8000 | – |" in lines  # per-fold table, fold 2 missing
    # 6 matched cases, hand-checked exact p = 10/64 (see test_paired_wilcoxon_matches_scipy_and_hand_value)
    assert any(line.startswith("| nnUNetTrainerLGMSNet | 6 | +0.0250 | 0.156") for line in lines), md
    assert any("nnUNetTrainerLGMSNet: fold(s) 2 missing" in line for line in lines)

    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3
    lg = next(r for r in rows if r["trainer"] == "nnUNetTrainerLGMSNet" and r["key"] == "2")
    assert lg["class"] == "tumor (2)" and lg["n_folds"] == "2" and lg["missing_folds"] == "2"
    assert float(lg["dice_mean"]) == pytest.approx(0.6) and float(lg["iou_std"]) == pytest.approx(0.0)
    assert float(lg["dice_fold_1"]) == pytest.approx(0.65) and lg["dice_fold_2"] == ""
    with open(out / "compare_wilcoxon.csv") as f:
        w = list(csv.DictReader(f))
    assert w[0]["n_pairs"] == "6" and float(w[0]["p"]) == pytest.approx(10 / 64)
    png = out / "compare_boxplot.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_errors_when_a_trainer_has_no_folds(tmp_path, monkeypatch, capsys):
    results = tmp_path / "nnUNet_results"
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    _fabricate_results(results, "Dataset777_Fake")
    rc = main(["compare", "-d", "777", "-c", CFG, "-tr", "nnUNetTrainer", "nnUNetTrainerGLIMS", "-f", "0", "1",
               "-o", str(tmp_path / "cmp")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "nnUNetTrainerGLIMS__nnUNetPlans__2d does not exist" in err
    assert not (tmp_path / "cmp").exists()


# ----------------------------------------------------------------------------------------------------------------
# profile


def test_profile_json_and_table(nnunet_env, tmp_path, capsys):
    from nnunetv2_lgms.benchmark.models import build_network, find_trainer_class

    trainers = ["nnUNetTrainerLGMSNet", "nnUNetTrainer"]
    out = tmp_path / "profile.json"
    assert main(["profile", "-d", str(DATASET_ID), "-c", CFG, "-tr", *trainers, "--repeats", "2", "--warmup", "1",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["trainer"] for r in rows] == trainers
    ctx = _ctx()
    for r in rows:
        for key in ("trainer", "params", "gflops", "gmacs", "inference_s", "inference_bs1_s", "train_step_s",
                    "peak_memory_mb", "sliding_window_s", "sliding_window_mirror_s", "device", "torch_threads"):
            assert key in r, key
        for key in ("params", "gflops", "gmacs", "inference_s", "inference_bs1_s", "train_step_s",
                    "peak_memory_mb", "peak_memory_inference_bs1_mb", "sliding_window_s", "sliding_window_mirror_s"):
            assert r[key] > 0, (r["trainer"], key, r[key])
        assert len(r["samples"]["train_step_s"]) == 2
        assert r["gmacs"] == pytest.approx(r["gflops"] / 2)
        assert r["device"] == "cpu" and r["torch_version"] == torch.__version__
        assert r["patch_size"] == [32, 32] and r["batch_size"] == 2
        assert r["sliding_window_case"] == "case_000" and r["sliding_window_tiles"] == 6  # 48x64 / 32x32, step .5
        cls = find_trainer_class(r["trainer"])
        assert r["params"] == sum(p.numel() for p in build_network(cls, ctx, True).parameters())
        assert r["params_inference"] <= r["params"]
        assert r["peak_memory_mb"] > r["params"] * 4 * 3 / 1e6  # params + grads + momentum at least
        assert r["mirror_axes"] == [0, 1]  # nnU-Net's 2D default, what the trainer's checkpoint would store
    assert "| nnUNetTrainerLGMSNet |" in printed and "| nnUNetTrainer |" in printed
    assert "patch 32x32, batch 2" in printed and f"torch {torch.__version__}" in printed
    ratio = rows[1]["params"] / rows[0]["params"]
    assert f"({ratio:.2f}x)" in printed


def test_profile_missing_plans_is_a_clear_error(nnunet_env, capsys):
    assert main(["profile", "-d", str(DATASET_ID), "-c", CFG, "-tr", "nnUNetTrainer", "-p", "NoSuchPlans"]) == 1
    assert "NoSuchPlans.json not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# evaluate-unseen


def _save_model(results: Path, ctx, trainer: str, folds) -> Path:
    """A trained-model folder as nnUNetv2_train leaves it (dataset.json, plans.json, fold_F/checkpoint_final.pth),
    with weights of the network built by the trainer (random, seeded per fold)."""
    from nnunetv2_lgms.benchmark.models import build_network, find_trainer_class

    folder = results / ctx.dataset_name / f"{trainer}__nnUNetPlans__{CFG}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(ctx.dataset_json))
    (folder / "plans.json").write_text(json.dumps(ctx.plans_manager.plans))
    cls = find_trainer_class(trainer)
    for fold in folds:
        torch.manual_seed(fold)
        net = build_network(cls, ctx, True)
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save({"network_weights": net.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                    "logging": {}, "_best_ema": None, "current_epoch": 1, "trainer_name": trainer,
                    "init_args": {"plans": ctx.plans_manager.plans, "configuration": CFG, "fold": fold,
                                  "dataset_json": ctx.dataset_json, "device": torch.device("cpu")},
                    "inference_allowed_mirroring_axes": (0, 1)},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


@pytest.fixture(scope="module")
def unseen_target(project):
    # zero-shot converters put the target data in imagesTr/labelsTr; other size and seed than the source
    return make_dataset(project / "nnUNet_raw", 995, name="UnseenLesions", dim=2, num_train=2, num_test=0,
                        size=(40, 56), seed=1)


def test_evaluate_unseen_table_predictions_and_summary(nnunet_env, unseen_target, tmp_path, capsys):
    from nnunetv2_lgms.benchmark.models import build_network, find_trainer_class
    from nnunetv2_lgms.networks.common import inference_parameters

    ctx = _ctx()
    trainers = ["nnUNetTrainerLGMSNet", "nnUNetTrainer"]
    for t in trainers:
        _save_model(nnunet_env / "nnUNet_results", ctx, t, [0, 1])
    out = tmp_path / "unseen"
    assert main(["evaluate-unseen", "-d", str(DATASET_ID), "-c", CFG, "-tr", *trainers, "-f", "0", "1",
                 "--target", "995", "-o", str(out), "--disable-tta"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "unseen.json").read_text())
    target = unseen_target.name
    assert [r["trainer"] for r in result["rows"]] == trainers
    assert result["folds"] == ["0", "1"]
    lines = printed.splitlines()
    assert f"| trainer | {target} Dice (%) | {target} IoU (%) | params |" in lines
    for r in result["rows"]:
        res = r["targets"][target]
        pred_dir = out / "predictions" / r["trainer"] / target
        assert sorted(p.name for p in pred_dir.glob("*.png")) == ["case_000.png", "case_001.png"]
        summary = json.loads((pred_dir / "summary.json").read_text())
        assert len(summary["metric_per_case"]) == 2 == res["n_cases"]
        assert res["dice"] == summary["foreground_mean"]["Dice"] and 0 <= res["dice"] <= 1
        assert res["iou"] == summary["foreground_mean"]["IoU"]
        net = build_network(find_trainer_class(r["trainer"]), ctx, False)
        assert r["params"] == inference_parameters(net)
        row = f"| {r['trainer']} | {100 * res['dice']:.2f} | {100 * res['iou']:.2f} | {r['params'] / 1e6:.2f}M |"
        assert row in lines, (row, printed)
    assert (out / "unseen.md").read_text() in printed
    assert (out / "unseen.csv").read_text().startswith("trainer,target,n_cases,dice,iou,params,folds")


def _altered_target(unseen_target: Path, tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "Dataset996_Altered"
    shutil.copytree(unseen_target, folder)
    dj = json.loads((folder / "dataset.json").read_text())
    dj.update(changes)
    (folder / "dataset.json").write_text(json.dumps(dj))
    return folder


def test_evaluate_unseen_channel_and_label_mismatch(nnunet_env, unseen_target, tmp_path, capsys):
    _save_model(nnunet_env / "nnUNet_results", _ctx(), "nnUNetTrainer", [0])
    grey = _altered_target(unseen_target, tmp_path / "a", channel_names={"0": "grey"})
    assert main(["evaluate-unseen", "-d", str(DATASET_ID), "-c", CFG, "-tr", "nnUNetTrainer", "-f", "0",
                 "--target", str(grey), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "channel mismatch" in err and "has 1 input channel(s)" in err and "trained on 3" in err
    assert not (tmp_path / "out" / "predictions").exists()

    labels = _altered_target(unseen_target, tmp_path / "b", labels={"background": 0, "lesion": 1, "other": 2})
    assert main(["evaluate-unseen", "-d", str(DATASET_ID), "-c", CFG, "-tr", "nnUNetTrainer", "-f", "0",
                 "--target", str(labels), "-o", str(tmp_path / "out")]) == 1
    assert "label map mismatch" in capsys.readouterr().err

    assert main(["evaluate-unseen", "-d", str(DATASET_ID), "-c", CFG, "-tr", "nnUNetTrainer", "-f", "0", "3",
                 "--target", "995", "-o", str(tmp_path / "out")]) == 1
    assert "fold_3/checkpoint_final.pth" in capsys.readouterr().err
