"""CVC-ClinicDB (Bernal et al. 2015): ``CVC-ClinicDB/Original/1.tif`` and ``CVC-ClinicDB/Ground Truth/1.tif``.

The Original TIFFs are 3-sample RGB tagged MINISBLACK (PIL refuses them; OpenCV and SimpleITK return one channel):
read with tifffile. Masks are mostly 0/255 with intermediate values: thresholded at 127. Written with Kvasir-SEG's
label map and RGB channels so a Kvasir model predicts it zero-shot.
"""
from __future__ import annotations

from pathlib import Path

from .core import DatasetSpec, Discovery, find_folder_pair, sanitize_case_id
from .kvasir import SPEC as _KVASIR

SPEC = DatasetSpec(
    key="cvc-clinicdb", title="CVCClinicDB", default_id=511, dim=2, channels="rgb", labels=dict(_KVASIR.labels),
    description="CVC-ClinicDB polyp frames; same labels and channels as Kvasir-SEG (zero-shot target).",
    reference="https://polyp.grand-challenge.org/CVCClinicDB/",
    citation="Bernal et al., WM-DOVA maps for accurate polyp highlighting in colonoscopy, CMIG 2015",
    licence="research and education only (README.txt of the release)",
    layout_hint="CVC-ClinicDB/Original/1.tif ... and CVC-ClinicDB/Ground Truth/1.tif ...",
    zero_shot_source="kvasir",
)


def case_id(stem: str) -> str:
    return f"clinicdb_{int(stem):03d}" if stem.isdigit() else "clinicdb_" + sanitize_case_id(stem)


def find_cases(source: Path, options: dict) -> Discovery:
    return find_folder_pair(source, "Original", "Ground Truth", ["CVC-ClinicDB", "TIF", "PNG"], "the CVC-ClinicDB folder", case_id)
