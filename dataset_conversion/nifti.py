"""3D helpers: header reads and geometry comparison with SimpleITK (nnU-Net's default reader for .nii.gz)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class Geometry(NamedTuple):
    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    name = path.name
    for s in NIFTI_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return path.stem


def geometry(path: Path) -> Geometry:
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return Geometry(tuple(r.GetSize()), tuple(r.GetSpacing()), tuple(r.GetOrigin()), tuple(r.GetDirection()))


def compare(img: Geometry, seg: Geometry) -> Tuple[Optional[str], bool]:
    """(problem, exact). Tiny float differences (rounding in headers) are tolerated and fixed by copying the image's
    geometry onto the segmentation."""
    if img.size != seg.size:
        return f"size {img.size} vs {seg.size}", False
    checks = (("spacing", img.spacing, seg.spacing, 1e-3), ("origin", img.origin, seg.origin, 1e-2),
              ("direction", img.direction, seg.direction, 1e-3))
    for what, a, b, tol in checks:
        if not np.allclose(a, b, atol=tol, rtol=1e-4):
            return f"{what} {tuple(np.round(a, 4))} vs {tuple(np.round(b, 4))}", False
    exact = img.spacing == seg.spacing and img.origin == seg.origin and img.direction == seg.direction
    return None, exact


def copy_or_convert(src: Path, dst: Path) -> None:
    """.nii.gz is copied byte for byte (header, spacing, origin, direction and dtype unchanged); .nii is compressed."""
    if src.name.lower().endswith(".nii.gz"):
        shutil.copyfile(src, dst)
    else:
        import SimpleITK as sitk

        sitk.WriteImage(sitk.ReadImage(str(src)), str(dst), True)


def write_labels(src: Path, dst: Path, max_label: int, reference: Optional[Geometry]) -> list:
    """Read a label volume, check its values are integers in 0..max_label, write uint8 with the same (or the image's)
    geometry. Returns the labels present."""
    import SimpleITK as sitk

    seg = sitk.ReadImage(str(src))
    arr = sitk.GetArrayFromImage(seg)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"label file {src} holds non-integer values")
    values = [int(v) for v in np.unique(arr)]
    bad = [v for v in values if v < 0 or v > max_label]
    if bad:
        raise ValueError(f"label file {src} holds values {bad[:10]} outside 0..{max_label}")
    out = sitk.GetImageFromArray(arr.astype(np.uint8))
    out.CopyInformation(seg)
    if reference is not None:
        out.SetSpacing(reference.spacing)
        out.SetOrigin(reference.origin)
        out.SetDirection(reference.direction)
    sitk.WriteImage(out, str(dst), True)
    return values
