"""Synthetic releases in each publisher's exact layout (file names, PIL modes, bit depths, NIfTI headers) for the
converter tests. Every builder returns the folder a user would pass to ``nnunetv2_lgms convert NAME``, plus the number
of training cases it expects."""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing.dummy
import types
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
from PIL import Image


# ----------------------------------------------------------------------------------------------- shared test helpers
@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    env = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = tmp_path / var
        monkeypatch.setenv(var, str(env[var]))
    env["nnUNet_raw"].mkdir()
    return env


def verify(folder: Path) -> str:
    """nnU-Net's verify_dataset_integrity, unchanged, with its process pool swapped for threads (spawning workers
    that import torch costs seconds per call). Returns its printed output; raises on failure."""
    from nnunetv2.experiment_planning import verify_dataset_integrity as vdi

    orig = vdi.multiprocessing
    vdi.multiprocessing = types.SimpleNamespace(get_context=lambda _method: multiprocessing.dummy)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            vdi.verify_dataset_integrity(str(folder), 2)
    finally:
        vdi.multiprocessing = orig
    text = out.getvalue()
    assert "Error" not in text and "Warning" not in text, text
    return text


def _blob(h: int, w: int, seed: int) -> np.ndarray:
    """A boolean ellipse somewhere inside an h x w frame."""
    rng = np.random.default_rng(seed)
    cy, cx = rng.integers(h // 3, 2 * h // 3), rng.integers(w // 3, 2 * w // 3)
    ry, rx = max(2, h // 5), max(2, w // 6)
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _grey(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def save(arr: np.ndarray, path: Path, mode: str = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode is not None:
        im = im.convert(mode)
    im.save(path, **kw)
    return path


def save_mask(mask: np.ndarray, mode: str, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask_as(mask, mode).save(path, **kw)
    return path


def mask_as(mask: np.ndarray, mode: str) -> Image.Image:
    """A boolean mask in one of the encodings seen in the releases."""
    m255 = (mask * 255).astype(np.uint8)
    if mode == "1":
        return Image.fromarray(m255).convert("1")
    if mode == "L":
        return Image.fromarray(m255)
    if mode == "RGB":
        return Image.fromarray(np.stack([m255] * 3, -1))
    if mode == "RGBA":
        return Image.fromarray(np.dstack([m255, m255, m255, np.full_like(m255, 255)]))
    raise ValueError(mode)


# ---------------------------------------------------------------------------------------------------------- 2D sets
def busi(root: Path, n_benign: int = 3, n_malignant: int = 2, n_normal: int = 2) -> Tuple[Path, dict]:
    """``Dataset_BUSI_with_GT/{benign,malignant,normal}/benign (1).png`` (grey stored as RGB, sizes vary),
    ``benign (1)_mask.png`` in modes 1 / RGBA / RGB, extra ``_mask_1``/``_mask_2`` files, empty normal masks.
    Returns the folder and the masks' union per case ID for checking the OR-merge."""
    base = root / "Dataset_BUSI_with_GT"
    unions = {}
    modes = ["1", "RGBA", "RGB"]
    for cls, n in (("benign", n_benign), ("malignant", n_malignant), ("normal", n_normal)):
        for i in range(1, n + 1):
            h, w = 40 + 3 * i, 50 + 2 * i
            seed = {"benign": 1000, "malignant": 2000, "normal": 3000}[cls] + i
            g = _grey(h, w, seed)
            save(np.stack([g] * 3, -1), base / cls / f"{cls} ({i}).png")  # grey stored as RGB
            if cls == "normal":
                m = np.zeros((h, w), bool)
                save_mask(m, "RGB", base / cls / f"{cls} ({i})_mask.png")
                unions[f"{cls}_{i}"] = m
                continue
            m = _blob(h, w, seed)
            save_mask(m, modes[(i - 1) % 3], base / cls / f"{cls} ({i})_mask.png")
            union = m.copy()
            for extra in range(1, {1: 1, 3: 2}.get(i, 0) + 1):  # benign (1): _mask_1; (3): _mask_1, _mask_2
                e = np.zeros((h, w), bool)
                e[2 * extra:2 * extra + 5, 3:9] = True  # a second lesion away from the first one
                save_mask(e, "1" if extra == 1 else "RGBA", base / cls / f"{cls} ({i})_mask_{extra}.png")
                union |= e
            unions[f"{cls}_{i}"] = union
    return base, unions


def busi_paper_names(root: Path, split_names: List[str]) -> Path:
    """Tiny BUSI release holding exactly the cases named in the paper's split lists (8x8 pixels each)."""
    base = root / "Dataset_BUSI_with_GT"
    for k, name in enumerate(sorted(set(split_names))):
        cls = name.split(" ")[0]
        save(np.full((8, 8, 3), k % 255, np.uint8), base / cls / f"{name}.png")
        m = np.zeros((8, 8), bool)
        m[2:5, 2:6] = True
        save_mask(m, "1", base / cls / f"{name}_mask.png")
    (base / "normal").mkdir(parents=True, exist_ok=True)
    return base


def isic2018(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """``ISIC2018_Task1-2_{Training,Validation}_Input/ISIC_000000x.jpg`` (+ ATTRIBUTION.txt, LICENSE.txt) and
    ``ISIC2018_Task1_{...}_GroundTruth/ISIC_000000x_segmentation.png`` (L, 0/255)."""
    k = 0
    for part, n in (("Training", n_train), ("Validation", n_val)):
        inp = root / f"ISIC2018_Task1-2_{part}_Input"
        gt = root / f"ISIC2018_Task1_{part}_GroundTruth"
        inp.mkdir(parents=True)
        gt.mkdir(parents=True)
        (inp / "ATTRIBUTION.txt").write_text("ISIC archive contributors\n")
        (inp / "LICENSE.txt").write_text("CC-BY-NC\n")
        for _ in range(n):
            name = f"ISIC_{k:07d}"
            h, w = 48 + k, 64 + 2 * k
            save(_rgb(h, w, k), inp / f"{name}.jpg", quality=90)
            save_mask(_blob(h, w, k), "L", gt / f"{name}_segmentation.png")
            k += 1
    return root


def kvasir(root: Path, n: int = 4) -> Path:
    """``Kvasir-SEG/images/<id>.jpg`` and ``masks/<id>.jpg`` (RGB JPEG masks: compression noise around 0 and 255)."""
    base = root / "Kvasir-SEG"
    boxes = {}
    for i in range(n):
        name = f"cju{i:04d}kwl35piu0993l0dewei{i}"
        h, w = 52 + 4 * i, 60 + 6 * i
        save(_rgb(h, w, 100 + i), base / "images" / f"{name}.jpg", quality=90)
        m = _blob(h, w, 100 + i)
        save_mask(m, "RGB", base / "masks" / f"{name}.jpg", quality=75)
        boxes[name] = {"height": h, "width": w, "bbox": []}
    (base / "kavsir_bboxes.json").write_text(json.dumps(boxes))
    return base


def tnscui(root: Path, n: int = 4) -> Path:
    """``image/1.PNG`` (grey), ``mask/1.PNG`` (0/255), ``train.csv``."""
    rows = ["ID,CATE"]
    for i in range(1, n + 1):
        h, w = 40 + i, 44 + 2 * i
        save(_grey(h, w, 200 + i), root / "image" / f"{i}.PNG", format="PNG")
        save_mask(_blob(h, w, 200 + i), "L", root / "mask" / f"{i}.PNG", format="PNG")
        rows.append(f"{i}.PNG,{i % 2}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def minisblack_rgb_tiff(path: Path, rgb: np.ndarray) -> Path:
    """A 3-sample TIFF tagged PhotometricInterpretation=MINISBLACK, as in CVC-ClinicDB's Original/ folder."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, rgb, photometric="minisblack", planarconfig="contig")
    return path


def cvc_clinicdb(root: Path, n: int = 3) -> Path:
    """``CVC-ClinicDB/Original/1.tif`` (MINISBLACK 3-sample) and ``Ground Truth/1.tif`` (0/255 plus intermediate
    values)."""
    import tifffile

    base = root / "CVC-ClinicDB"
    for i in range(1, n + 1):
        h, w = 36, 48
        minisblack_rgb_tiff(base / "Original" / f"{i}.tif", _rgb(h, w, 300 + i))
        m = (_blob(h, w, 300 + i) * 255).astype(np.uint8)
        m[0, :5] = [8, 11, 30, 112, 96]  # anti-aliasing residue: below the threshold
        m[h // 2, w // 2] = 200  # above it
        (base / "Ground Truth").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(base / "Ground Truth" / f"{i}.tif", m)
    (base / "README.txt").write_text("CVC-ClinicDB\nresearch and education only\n")
    return base


def cvc_300(root: Path, n: int = 3) -> Path:
    base = root / "TestDataset" / "CVC-300"
    for i in range(149, 149 + n):
        save(_rgb(30, 40, i), base / "images" / f"{i}.png")
        save_mask(_blob(30, 40, i), "L", base / "masks" / f"{i}.png")
    return root / "TestDataset"


def ph2(root: Path, n: int = 3) -> Path:
    """``PH2Dataset/PH2 Dataset images/IMD002/IMD002_Dermoscopic_Image/IMD002.bmp``, ``IMD002_lesion/
    IMD002_lesion.bmp`` (1-bit, one RGB), ``IMD002_roi/*.bmp`` (ignored), ``PH2_dataset.txt``."""
    base = root / "PH2Dataset"
    folder = base / "PH2 Dataset images"
    for k in range(n):
        name = f"IMD{2 + k:03d}"
        h, w = 44, 58
        save(_rgb(h, w, 400 + k), folder / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp")
        m = _blob(h, w, 400 + k)
        les = folder / name / f"{name}_lesion" / f"{name}_lesion.bmp"
        les.parent.mkdir(parents=True)
        save_mask(m, "RGB" if k == 1 else "1", les)
        roi = folder / name / f"{name}_roi"
        roi.mkdir()
        save_mask(~m, "1", roi / f"{name}_R1_Label4.bmp")
    (base / "PH2_dataset.txt").write_text("Name\tClinical Diagnosis\n")
    (base / "Readme.txt").write_text("PH2\n")
    return base


def bus(root: Path, n: int = 3) -> Path:
    base = root / "BUS_Dataset_B"
    for i in range(1, n + 1):
        g = _grey(34, 46, 500 + i)
        save(g, base / "original" / f"{i:06d}.png")
        save_mask(_blob(34, 46, 500 + i), "L", base / "GT" / f"{i:06d}.png")
    return base


def folder(root: Path) -> Path:
    """A generic pair of folders: JPEG and PNG images, masks named ``<stem>_mask.png`` in 0/1 and 0/255."""
    for i, ext in enumerate([".jpg", ".png", ".png"]):
        name = f"scan {i} (a)"
        save(_rgb(28, 36, 600 + i), root / "img" / f"{name}{ext}")
        m = _blob(28, 36, 600 + i).astype(np.uint8)
        save(m if i == 0 else m * 255, root / "gt" / f"{name}_mask.png")
    return root


# ---------------------------------------------------------------------------------------------------------- 3D sets
def _direction(i: int) -> Tuple[float, ...]:
    if i % 2 == 0:
        return (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    c, s = np.cos(0.3), np.sin(0.3)  # a rotation about z and a flipped x, as in many scanner exports
    return (-c, -s, 0.0, -s, c, 0.0, 0.0, 0.0, 1.0)


def write_sitk(arr: np.ndarray, path: Path, spacing, origin, direction) -> Path:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path), True)
    return path


def btcv(root: Path, train: List[int] = (1, 2, 3), test: List[int] = (61,), shape=(6, 12, 14),
         label_dtype=np.uint8) -> Path:
    """``RawData/Training/img/img0001.nii.gz`` (int16 CT, spacing 0.7 x 0.7 x 3 mm, non-identity direction for odd
    cases), ``RawData/Training/label/label0001.nii.gz`` (labels 0..13), ``RawData/Testing/img/img0061.nii.gz``."""
    base = root / "RawData"
    for i in list(train) + list(test):
        rng = np.random.default_rng(i)
        ct = rng.integers(-1000, 1500, shape).astype(np.int16)
        geo = ((0.7, 0.7, 3.0), (-170.5 + i, 12.25, -300.0 - i), _direction(i))
        if i in train:
            write_sitk(ct, base / "Training" / "img" / f"img{i:04d}.nii.gz", *geo)
            lab = (np.arange(np.prod(shape)).reshape(shape) % 14).astype(label_dtype)
            write_sitk(lab, base / "Training" / "label" / f"label{i:04d}.nii.gz", *geo)
        else:
            write_sitk(ct, base / "Testing" / "img" / f"img{i:04d}.nii.gz", *geo)
    return base


def kits23(root: Path, n: int = 3, shape=(10, 8, 6)) -> Path:
    """kits23 repository: ``dataset/case_00000/imaging.nii.gz``, ``segmentation.nii.gz`` (0..3) and
    ``instances/`` (ignored). Anisotropic spacing and an oblique affine."""
    import nibabel as nib

    base = root / "kits23"
    for i in range(n):
        d = base / "dataset" / f"case_{i:05d}"
        (d / "instances").mkdir(parents=True)
        affine = np.array([[0.0, 0.0, -0.78, 120.0], [0.0, -0.78, 0.0, 80.0], [-3.0 - i, 0.0, 0.0, 40.0],
                           [0, 0, 0, 1.0]])
        rng = np.random.default_rng(700 + i)
        nib.save(nib.Nifti1Image(rng.integers(-1000, 1000, shape).astype(np.int16), affine), d / "imaging.nii.gz")
        seg = np.zeros(shape, np.uint8)
        seg[2:7, 2:6, 1:4] = 1
        seg[3:5, 3:5, 2:3] = 2
        seg[6, 2, 1] = 3
        nib.save(nib.Nifti1Image(seg, affine), d / "segmentation.nii.gz")
        instance = d / "instances" / "kidney_instance-1_annotation-1.nii.gz"
        nib.save(nib.Nifti1Image((seg > 0).astype(np.uint8), affine), instance)
    return base


BUILDERS = {
    "busi": lambda r: (busi(r)[0], 5),  # benign + malignant
    "isic2018": lambda r: (isic2018(r), 4),
    "kvasir": lambda r: (kvasir(r), 4),
    "tnscui": lambda r: (tnscui(r), 4),
    "cvc-clinicdb": lambda r: (cvc_clinicdb(r), 3),
    "cvc-300": lambda r: (cvc_300(r), 3),
    "ph2": lambda r: (ph2(r), 3),
    "bus": lambda r: (bus(r), 3),
    "folder": lambda r: (folder(r), 3),
    "btcv": lambda r: (btcv(r), 3),
    "kits23": lambda r: (kits23(r), 3),
}
