"""CVC-300 (EndoScene test split, as distributed in PraNet's TestDataset): ``TestDataset/CVC-300/images/*.png`` and
``masks/*.png`` (0/255). Same labels and channels as Kvasir-SEG (zero-shot target of the LGMSNet paper's Table 2)."""
from __future__ import annotations

from pathlib import Path

from .core import DatasetSpec, Discovery, find_folder_pair, sanitize_case_id
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
    return find_folder_pair(source, "images", "masks", ["CVC-300", "TestDataset/CVC-300"], "TestDataset/CVC-300", case_id)
