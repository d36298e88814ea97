"""ISIC 2018 Task 1 lesion segmentation.

Layout: ``ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg`` + ``ISIC2018_Task1_Training_GroundTruth/
ISIC_0000000_segmentation.png``; the same for ``_Validation_`` and ``_Test_`` (written to imagesTs/labelsTs when
present). ``ATTRIBUTION.txt``/``LICENSE.txt`` are ignored. JPEG inputs are re-encoded as PNG; masks 0/255 -> 0/1.
"""
from __future__ import annotations

from pathlib import Path

from .core import ConversionError, DatasetSpec, Discovery, find_root, list_files, pair_by_stem, sanitize_case_id

SPEC = DatasetSpec(
    key="isic2018", title="ISIC2018", default_id=502, dim=2, channels="rgb",
    labels={"background": 0, "lesion": 1},
    description="ISIC 2018 Task 1 skin lesion segmentation (Training -> imagesTr; Validation and Test -> imagesTs).",
    reference="https://challenge.isic-archive.com/data/#2018",
    citation="Codella et al. 2019 (arXiv:1902.03368); Tschandl et al., HAM10000, Sci. Data 2018",
    licence="CC-BY-NC 4.0",
    layout_hint="ISIC2018_Task1-2_Training_Input/ISIC_*.jpg and ISIC2018_Task1_Training_GroundTruth/"
                "ISIC_*_segmentation.png",
)
SPLIT_PREFIX = "isic18"
_TRAIN = "ISIC2018_Task1-2_Training_Input"


def split_case_id(name: str) -> str:
    return sanitize_case_id(name)


def _strip_seg(stem: str) -> str:
    return stem[: -len("_segmentation")] if stem.endswith("_segmentation") else stem


def find_cases(source: Path, options: dict) -> Discovery:
    root = find_root(source, _TRAIN, ["ISIC2018", "isic2018"])
    if not (root / _TRAIN).is_dir():
        raise ConversionError(f"{source / _TRAIN} not found: pass the folder that holds the extracted "
                              f"ISIC2018_Task1-2_Training_Input and ISIC2018_Task1_Training_GroundTruth folders")
    cases, problems = [], []
    for part, subset in (("Training", "Tr"), ("Validation", "Ts"), ("Test", "Ts")):
        img_dir = root / f"ISIC2018_Task1-2_{part}_Input"
        gt_dir = root / f"ISIC2018_Task1_{part}_GroundTruth"
        if not img_dir.is_dir():
            continue
        if subset == "Tr" and not gt_dir.is_dir():
            raise ConversionError(f"{gt_dir} not found: extract ISIC2018_Task1_Training_GroundTruth.zip next to "
                                  f"{img_dir.name}")
        d = pair_by_stem(list_files(img_dir), list_files(gt_dir), img_dir, gt_dir, sanitize_case_id,
                         mask_stem_fn=_strip_seg, subset=subset, require_masks=gt_dir.is_dir())
        cases += d.cases
        problems += d.problems
    return Discovery(cases, problems)
