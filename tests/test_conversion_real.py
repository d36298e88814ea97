"""Converters on the real release samples in ``../shared/data`` (beside the repository, as in CI). Skipped when the
folder is absent. The real data is only read (small subsets through symlinks or the test-only ``limit``), never
copied into the repository."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nnunetv2_lgms.dataset_conversion import convert

from conversion_fixtures import nnunet_env, verify  # noqa: F401  (pytest fixture and helper)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def need(folder: str) -> Path:
    path = DATA / folder
    if not path.is_dir():
        pytest.skip(f"real sample {path} not available")
    return path


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def plan_and_preprocess(dataset_id: int) -> Path:
    """The stock nnUNetv2_plan_and_preprocess entry point, 2d only, one worker."""
    exe = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    cmd = [str(exe), "-d", str(dataset_id), "-c", "2d", "-np", "1", "-npfp", "1"]  # integrity: verify() above
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, nnUNet_compile="f"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pre = Path(os.environ["nnUNet_preprocessed"])
    return next(pre.glob(f"Dataset{dataset_id:03d}_*"))


def test_kvasir_real_subset_converts_and_preprocesses(nnunet_env):
    src = need("Kvasir-SEG")
    res = convert("kvasir", src, limit=20, resize=64, num_workers=2, progress=False)
    assert res.num_training == 20 and res.path.name == "Dataset553_KvasirSEG_64px"
    verify(res.path)
    for f in sorted((res.path / "labelsTr").iterdir()):
        assert set(np.unique(png(f))) == {0, 1}  # JPEG noise gone, polyp present
    assert png(next((res.path / "imagesTr").iterdir())).shape == (64, 64, 3)
    pre = plan_and_preprocess(553)
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert list(plans["configurations"]) [0] == "2d"
    assert len(list((pre / "nnUNetPlans_2d").glob("*.b2nd"))) + len(list((pre / "nnUNetPlans_2d").glob("*.npz"))) >= 20


def _busi_subset(src: Path, dst: Path) -> Path:
    """Symlinks to the interesting real BUSI cases: 3 masks (benign 195), RGBA extra masks (benign 4, 54),
    a multi-mask malignant case (53), colour-annotated images (benign 13), plain cases and normal cases."""
    picks = {"benign": [1, 2, 4, 13, 54, 195], "malignant": [1, 2, 53], "normal": [1, 2]}
    for cls, ids in picks.items():
        (dst / cls).mkdir(parents=True)
        for i in ids:
            for f in (src / cls).glob(f"{cls} ({i})*.png"):
                if f.name == f"{cls} ({i}).png" or f.name.startswith(f"{cls} ({i})_mask"):
                    (dst / cls / f.name).symlink_to(f)
    return dst


def test_busi_real_subset_converts_and_preprocesses(nnunet_env, tmp_path):
    src = _busi_subset(need("Dataset_BUSI_with_GT"), tmp_path / "Dataset_BUSI_with_GT")
    res = convert("busi", src, include_normal=True, num_workers=2, progress=False)
    assert res.num_training == 11
    verify(res.path)
    union = np.zeros_like(png(res.path / "labelsTr" / "benign_195.png"), bool)
    masks = sorted(src.joinpath("benign").glob("benign (195)_mask*.png"))
    assert len(masks) == 3
    for m in masks:
        union |= np.asarray(Image.open(m).convert("L")) > 127
    assert np.array_equal(png(res.path / "labelsTr" / "benign_195.png"), union.astype(np.uint8))
    assert png(res.path / "imagesTr" / "benign_13_0000.png").ndim == 2  # one grey channel
    assert not png(res.path / "labelsTr" / "normal_1.png").any()

    res64 = convert("busi", src, resize=64, num_workers=1, progress=False)
    assert res64.num_training == 9  # benign + malignant (the paper's classes)
    verify(res64.path)
    pre = plan_and_preprocess(551)
    assert (pre / "nnUNetPlans.json").is_file()


def test_cvc_clinicdb_real_tiffs(nnunet_env):
    import tifffile

    src = need("CVC-ClinicDB")
    res = convert("cvc-clinicdb", src, num_workers=1, progress=False)
    assert res.num_training == 5
    verify(res.path)
    img = png(res.path / "imagesTr" / "clinicdb_001_0000.png")
    assert img.shape == (288, 384, 3)
    assert np.array_equal(img, tifffile.imread(src / "Original" / "1.tif"))
    gt = tifffile.imread(src / "Ground Truth" / "1.tif")
    assert np.array_equal(png(res.path / "labelsTr" / "clinicdb_001.png"), (gt > 127).astype(np.uint8))


def test_ph2_real_bmps(nnunet_env):
    src = need("PH2Dataset")
    res = convert("ph2", src, num_workers=1, progress=False)
    assert res.num_training == 5
    verify(res.path)
    rgb_mask = src / "PH2 Dataset images" / "IMD002" / "IMD002_lesion" / "IMD002_lesion.bmp"
    assert Image.open(rgb_mask).mode == "RGB"
    ref = np.asarray(Image.open(rgb_mask)).max(-1) > 127
    assert np.array_equal(png(res.path / "labelsTr" / "IMD002.png"), ref.astype(np.uint8))
    assert png(res.path / "imagesTr" / "IMD002_0000.png").shape[-1] == 3


def test_btcv_layout_with_real_ct_header(nnunet_env, tmp_path):
    """TotalSegmentator's real CT crop (3 mm, flipped x/y direction) in BTCV's layout, its model-output labels mapped
    to BTCV's organ numbering: image bytes and geometry must survive, labels become uint8 0..13."""
    import SimpleITK as sitk

    src = need("TotalSegmentator-example")
    raw = tmp_path / "RawData"
    (raw / "Training" / "img").mkdir(parents=True)
    (raw / "Training" / "label").mkdir(parents=True)
    (raw / "Training" / "img" / "img0001.nii.gz").symlink_to(src / "example_ct_sm.nii.gz")
    seg = sitk.ReadImage(str(src / "example_seg.nii.gz"))
    ts = sitk.GetArrayFromImage(seg)
    # TotalSegmentator v1 -> BTCV: spleen, kidneys, gallbladder keep 1-4; liver..adrenals (5-12) shift to 6-13
    lut = np.zeros(256, np.uint8)
    lut[1:5] = [1, 2, 3, 4]
    lut[5:13] = np.arange(6, 14)
    lab = sitk.GetImageFromArray(lut[ts])
    lab.CopyInformation(seg)
    sitk.WriteImage(lab, str(raw / "Training" / "label" / "label0001.nii.gz"), True)

    res = convert("btcv", raw, num_workers=1, progress=False)
    assert res.num_training == 1
    verify(res.path)
    out_img = res.path / "imagesTr" / "btcv_0001_0000.nii.gz"
    assert out_img.read_bytes() == (src / "example_ct_sm.nii.gz").read_bytes()
    out_lab = sitk.ReadImage(str(res.path / "labelsTr" / "btcv_0001.nii.gz"))
    ref = sitk.ReadImage(str(src / "example_ct_sm.nii.gz"))
    assert out_lab.GetSpacing() == ref.GetSpacing() and out_lab.GetOrigin() == ref.GetOrigin()
    assert out_lab.GetDirection() == ref.GetDirection()
    assert out_lab.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(out_lab), lut[ts])
