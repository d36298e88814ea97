"""KiTS23 (kits23 repository ``dataset/``): ``case_00000/imaging.nii.gz`` + ``segmentation.nii.gz`` (``instances/``
ignored). Mirrors nnU-Net's own Dataset220_KiTS2023 converter: files copied unchanged, region-based training with
kidney = {1,2,3}, masses = {2,3}, tumor = {2}, ``regions_class_order`` (1, 3, 2), read with NibabelIOWithReorient."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from .core import Case, CaseProblem, ConversionError, DatasetSpec, Discovery, Problem

SPEC = DatasetSpec(
    key="kits23", title="KiTS2023", default_id=506, dim=3, channels="CT", file_ending=".nii.gz",
    labels={"background": 0, "kidney": (1, 2, 3), "masses": (2, 3), "tumor": 2},
    regions_class_order=(1, 3, 2), reader_writer="NibabelIOWithReorient", release="0.1.3",
    description="KiTS23 kidney, tumor and cyst CT; region-based training as in nnU-Net's Dataset220_KiTS2023.",
    reference="https://kits-challenge.org/kits23/",
    citation="Heller et al., The KiTS21 challenge, arXiv:2307.01984",
    licence="CC BY-NC-SA 4.0",
    layout_hint="dataset/case_00000/imaging.nii.gz and dataset/case_00000/segmentation.nii.gz",
)
_CASE = re.compile(r"^case_\d+$")


def find_cases(source: Path, options: dict) -> Discovery:
    root = source / "dataset" if (source / "dataset").is_dir() else source
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and _CASE.match(p.name))
    if not dirs:
        raise ConversionError(f"no case_XXXXX folders in {root}: pass the kits23 repository (or its dataset/ "
                              f"folder) after running its download script")
    cases, problems = [], []
    for d in dirs:
        img, seg = d / "imaging.nii.gz", d / "segmentation.nii.gz"
        if not img.is_file():
            problems.append(Problem(f"missing image: {img} not found (run kits23_download_data or remove {d})",
                                    case_id=d.name))
        if not seg.is_file():
            problems.append(Problem(f"missing segmentation: {seg} not found for {img} (restore it or remove {d})",
                                    case_id=d.name))
        cases.append(Case(d.name, img, [seg] if seg.is_file() else [], source_name=d.name))
    return Discovery(cases, problems)


def check_case(case: Case):
    import nibabel as nib
    import numpy as np

    try:
        im = nib.load(str(case.image))
    except Exception as e:
        return f"unreadable image {case.image}: {e} (replace the file or remove the case)"
    for m in case.masks:
        try:
            sg = nib.load(str(m))
        except Exception as e:
            return f"unreadable segmentation {m}: {e} (replace the file or remove the case)"
        if im.shape != sg.shape:
            return f"size mismatch: image {case.image} is {im.shape} but segmentation {m} is {sg.shape}"
        if not np.allclose(im.affine, sg.affine, atol=1e-3):
            return f"image {case.image} and segmentation {m} have different affines (fix or remove the case)"
    return None


def convert_case(case: Case, out_dir: Path, settings: dict) -> dict:
    try:
        shutil.copyfile(case.image, out_dir / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        for m in case.masks:
            shutil.copyfile(m, out_dir / "labelsTr" / f"{case.case_id}.nii.gz")
    except OSError as e:
        raise CaseProblem(f"cannot copy case {case.case_id}: {e}")
    return {}
