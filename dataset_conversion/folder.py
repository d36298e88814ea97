"""Any 2D set given as a folder of images and a folder of masks, matched by file stem.

``nnunetv2_lgms convert folder SOURCE --images images --masks masks [--mask-suffix _mask] [--name MyData]
[--channels auto|rgb|grey] [--multi-label] [--label-name lesion]``. ``--images``/``--masks`` are relative to SOURCE
unless absolute. Binary masks (any encoding) become 0/1; with ``--multi-label`` the distinct mask values found in the
whole set (sorted) become the consecutive labels 0..K.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import io2d
from .core import ConversionError, DatasetSpec, Discovery, Problem, list_files, pair_by_stem, sanitize_case_id

SPEC = DatasetSpec(
    key="folder", title="Folder", default_id=520, dim=2, channels="rgb",
    labels={"background": 0, "foreground": 1},
    description="2D images and masks matched by file stem.",
    layout_hint="SOURCE/images/<name>.<png|jpg|bmp|tif> and SOURCE/masks/<name>[suffix].<ext>",
)
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def _dirs(source: Path, options: dict):
    img_dir = Path(options.get("images") or "images")
    mask_dir = Path(options.get("masks") or "masks")
    img_dir = img_dir if img_dir.is_absolute() else source / img_dir
    mask_dir = mask_dir if mask_dir.is_absolute() else source / mask_dir
    return img_dir, mask_dir


def default_title(source: Path) -> str:
    try:
        return sanitize_case_id(source.resolve().name)
    except ValueError:
        return "Folder"


def find_cases(source: Path, options: dict) -> Discovery:
    img_dir, mask_dir = _dirs(source, options)
    for d, flag in ((img_dir, "--images"), (mask_dir, "--masks")):
        if not d.is_dir():
            raise ConversionError(f"{d} not found: point {flag} at the folder (relative to {source} or absolute)")
    suffix = options.get("mask_suffix") or ""

    def mask_stem(stem: str) -> str:
        return stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem

    return pair_by_stem(list_files(img_dir), list_files(mask_dir), img_dir, mask_dir, sanitize_case_id,
                        mask_stem_fn=mask_stem)


def _is_colour(path: Path) -> bool:
    if path.suffix.lower() in io2d.TIFF_SUFFIXES:
        arr = io2d.read_image(path)
        return arr.ndim == 3
    from PIL import Image

    with Image.open(path) as im:
        return im.mode in _COLOUR_MODES


def prepare(cases, options):
    extra, problems = {}, []
    channels = options.get("channels") or "auto"
    if channels == "auto":
        channels = "grey"
        for c in cases:
            try:
                if _is_colour(c.image):
                    channels = "rgb"
                    break
            except Exception:
                pass  # unreadable files are reported by the checks
    extra["channels"] = channels
    name = options.get("label_name") or "foreground"
    if not options.get("multi_label"):
        extra["labels_override"] = {"background": 0, name: 1}
        return extra, problems
    values = {0}
    for c in cases:
        for m in c.masks:
            try:
                arr = io2d.collapse_channels(io2d.read_mask(m))
            except Exception as e:
                problems.append(Problem(f"unreadable mask {m}: {e} (replace it or remove the case)", c.case_id))
                continue
            values.update(int(v) for v in np.unique(arr))
    values = sorted(values)
    if len(values) > 256:
        raise ConversionError(f"--multi-label: {len(values)} distinct mask values (more than 255 labels); "
                              f"are these really label maps?")
    extra["label_values"] = values
    extra["labels_override"] = {"background": 0, **{f"label_{v}": i for i, v in enumerate(values) if i > 0}}
    return extra, problems
