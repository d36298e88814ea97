"""Kvasir-SEG (Jha et al., MMM 2020): ``Kvasir-SEG/images/<id>.jpg`` + ``Kvasir-SEG/masks/<id>.jpg``.

Images are JPEG (re-encoded losslessly as PNG: nnU-Net refuses .jpg); masks are RGB JPEGs with compression noise
(0-8 and 247-255), thresholded at 127. ``kavsir_bboxes.json`` is ignored.
"""
from __future__ import annotations

from pathlib import Path

from .core import DatasetSpec, Discovery, find_folder_pair, sanitize_case_id

SPEC = DatasetSpec(
    key="kvasir", title="KvasirSEG", default_id=503, dim=2, channels="rgb",
    labels={"background": 0, "polyp": 1},
    description="Kvasir-SEG polyp segmentation, 1000 colonoscopy images (JPEG re-encoded as PNG, masks thresholded).",
    reference="https://datasets.simula.no/kvasir-seg/",
    citation="Jha et al., Kvasir-SEG: A Segmented Polyp Dataset, MMM 2020",
    licence="research and education only; cite the paper",
    layout_hint="Kvasir-SEG/images/*.jpg and Kvasir-SEG/masks/*.jpg",
)


def find_cases(source: Path, options: dict) -> Discovery:
    return find_folder_pair(source, "images", "masks", ["Kvasir-SEG", "kvasir-seg"], "the Kvasir-SEG folder", sanitize_case_id)
