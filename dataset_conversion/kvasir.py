"""Kvasir-SEG (Jha et al., MMM 2020): ``Kvasir-SEG/images/<id>.jpg`` + ``Kvasir-SEG/masks/<id>.jpg``.

Images are JPEG (re-encoded losslessly as PNG: nnU-Net refuses .jpg); masks are RGB JPEGs with compression noise
(0-8 and 247-255), thresholded at 127. ``kavsir_bboxes.json`` is ignored.
"""
from __future__ import annotations

from pathlib import Path

from .core import ConversionError, DatasetSpec, Discovery, find_root, list_files, pair_by_stem, sanitize_case_id

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
    root = find_root(source, "images", ["Kvasir-SEG", "kvasir-seg"])
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise ConversionError(f"{d} not found: pass the Kvasir-SEG folder (it holds images/ and masks/)")
    return pair_by_stem(list_files(img_dir), list_files(mask_dir), img_dir, mask_dir, sanitize_case_id)
