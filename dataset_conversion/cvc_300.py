"""CVC-300 (EndoScene test split, as distributed in PraNet's TestDataset): ``TestDataset/CVC-300/images/*.png`` and
``masks/*.png`` (0/255). Same labels and channels as Kvasir-SEG (zero-shot target of the LGMSNet paper's Table 2)."""
from __future__ import annotations

from pathlib import Path

from .core import ConversionError, DatasetSpec, Discovery, find_root, list_files, pair_by_stem, sanitize_case_id
from .kvasir import SPEC as _KVASIR

SPEC = DatasetSpec(
    key="cvc-300", title="CVC300", default_id=512, dim=2, channels="rgb", labels=dict(_KVASIR.labels),
    description="CVC-300 polyp test set (PraNet TestDataset); same labels and channels as Kvasir-SEG.",
    reference="https://github.com/DengPingFan/PraNet (TestDataset)",
    citation="Vazquez et al., A benchmark for endoluminal scene segmentation of colonoscopy images, JHE 2017",
    licence="research use",
    layout_hint="TestDataset/CVC-300/images/*.png and TestDataset/CVC-300/masks/*.png",
    zero_shot_source="kvasir",
)


def case_id(stem: str) -> str:
    return "cvc300_" + sanitize_case_id(stem)


def find_cases(source: Path, options: dict) -> Discovery:
    root = find_root(source, "images", ["CVC-300", "TestDataset/CVC-300"])
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise ConversionError(f"{d} not found: pass TestDataset/CVC-300 (it holds images/ and masks/)")
    return pair_by_stem(list_files(img_dir), list_files(mask_dir), img_dir, mask_dir, case_id)
