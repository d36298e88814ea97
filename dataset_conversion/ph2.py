"""PH2 dermoscopy (Mendonca et al. 2013): ``PH2Dataset/PH2 Dataset images/IMD002/IMD002_Dermoscopic_Image/IMD002.bmp``
and ``.../IMD002_lesion/IMD002_lesion.bmp`` (``IMD002_roi`` is ignored). Lesion masks are mostly 1-bit BMP, one is RGB
0/255. Same labels and channels as ISIC 2018 so an ISIC model predicts it zero-shot."""
from __future__ import annotations

from pathlib import Path

from .core import Case, ConversionError, DatasetSpec, Discovery, Problem, find_root, sanitize_case_id
from .isic2018 import SPEC as _ISIC

SPEC = DatasetSpec(
    key="ph2", title="PH2", default_id=513, dim=2, channels="rgb", labels=dict(_ISIC.labels),
    description="PH2 dermoscopy lesions; same labels and channels as ISIC 2018 (zero-shot target).",
    reference="https://www.fc.up.pt/addi/ph2%20database.html",
    citation="Mendonca et al., PH2 - A dermoscopic image database for research and benchmarking, EMBC 2013",
    licence="research use; cite the paper",
    layout_hint="PH2Dataset/PH2 Dataset images/IMD002/IMD002_Dermoscopic_Image/IMD002.bmp",
    zero_shot_source="isic2018",
)
_IMAGES = "PH2 Dataset images"


def find_cases(source: Path, options: dict) -> Discovery:
    root = find_root(source, _IMAGES, ["PH2Dataset"])
    folder = root / _IMAGES
    if not folder.is_dir():
        raise ConversionError(f"{folder} not found: pass the PH2Dataset folder (it holds '{_IMAGES}')")
    cases, problems = [], []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = d.name
        cid = sanitize_case_id(name)
        img = d / f"{name}_Dermoscopic_Image" / f"{name}.bmp"
        mask = d / f"{name}_lesion" / f"{name}_lesion.bmp"
        if not img.is_file():
            problems.append(Problem(f"missing image: {img} not found (restore it or remove {d})", case_id=cid))
        if not mask.is_file():
            problems.append(Problem(f"missing mask: {mask} not found for image {img} (restore it or remove {d})",
                                    case_id=cid))
        cases.append(Case(cid, img, [mask] if mask.is_file() else [], source_name=name))
    return Discovery(cases, problems)
