"""2D image and mask reading, normalisation and writing for the converters.

Everything here works on numpy arrays: ``read_image`` returns ``(H, W)`` or ``(H, W, 3)``, ``read_mask`` returns the
raw mask values and ``binarize`` turns any of the mask encodings found in the public releases (1-bit, 0/255, 0/1,
RGB, RGBA, JPEG-compressed) into a boolean array.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")
#: formats that lose information: masks stored this way carry compression noise around the edges
LOSSY_SUFFIXES = (".jpg", ".jpeg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


def _tiff_array(path: Path) -> np.ndarray:
    import tifffile

    arr = tifffile.imread(str(path))
    # a few writers store colour planar (3, H, W); nnU-Net and PIL expect (H, W, 3)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    return arr


def _tiff_size(path: Path) -> Tuple[int, int]:
    import tifffile

    with tifffile.TiffFile(str(path)) as tf:
        series = tf.series[0]
        axes, shape = series.axes, series.shape
        if "Y" in axes and "X" in axes:
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        return int(shape[0]), int(shape[1])


def image_size(path: Path) -> Tuple[int, int]:
    """(height, width) from the file header only. Raises on unreadable files."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            return _tiff_size(path)
        except Exception:
            pass  # fall through to PIL, which reads some TIFFs tifffile does not
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return h, w


def _pil_open(path: Path):
    from PIL import Image

    im = Image.open(path)
    im.load()  # decode now so that truncated files fail here, naming the file
    return im


def read_image(path: Path) -> np.ndarray:
    """Return ``(H, W)`` or ``(H, W, 3)`` (alpha dropped). Uses tifffile for TIFF: CVC-ClinicDB's 3-sample RGB TIFFs
    tagged MINISBLACK are refused by PIL and read as one channel by OpenCV/SimpleITK."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            arr = _tiff_array(path)
        except Exception:
            arr = None
        if arr is not None:
            if arr.ndim == 3 and arr.shape[-1] == 4:
                arr = arr[..., :3]
            if arr.ndim == 3 and arr.shape[-1] == 2:  # grey + alpha
                arr = arr[..., 0]
            if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
                raise ValueError(f"unsupported TIFF layout {arr.shape} (expected H x W or H x W x 3)")
            return arr
    with _pil_open(path) as im:
        mode = im.mode
        if mode in ("RGB",):
            return np.asarray(im)
        if mode in ("RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            return np.asarray(im.convert("RGB"))
        if mode in ("L", "I;16", "I;16B", "I;16L"):
            return np.asarray(im)
        if mode == "LA":
            return np.asarray(im)[..., 0]
        if mode == "1":
            return np.asarray(im.convert("L"))
        if mode == "I":
            arr = np.asarray(im)
            if arr.min() >= 0 and arr.max() <= 65535:
                return arr.astype(np.uint16)
        raise ValueError(f"unsupported image mode {mode!r}")


def read_mask(path: Path) -> np.ndarray:
    """Raw mask values: bool for 1-bit, palette indices for 'P', ``(H, W, C)`` for RGB(A)."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            return _tiff_array(path)
        except Exception:
            pass
    with _pil_open(path) as im:
        mode = im.mode
        if mode in ("1", "L", "P", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I"):
            return np.asarray(im)
        if mode == "LA":
            return np.asarray(im)[..., 0]
        return np.asarray(im.convert("RGB"))


def collapse_channels(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) mask -> (H, W): max over colour channels; alpha is used only when the colour is empty and the alpha
    channel carries the drawing."""
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3:
        raise ValueError(f"unsupported mask shape {arr.shape}")
    if arr.shape[-1] in (2, 4):
        colour, alpha = arr[..., :-1], arr[..., -1]
        if colour.max() == 0 and alpha.min() != alpha.max():
            return alpha
        arr = colour
    return arr.max(axis=-1)


def binarize(arr: np.ndarray, lossy: bool = False) -> np.ndarray:
    """Any binary-mask encoding -> bool.

    * bool (1-bit), or exactly two values {0, v}: foreground is ``> 0`` (0/1, 0/255, 0/128 ...);
    * more values (JPEG noise 0-8 / 247-255, anti-aliased edges): threshold at the middle of the 8-bit range (or of
      the value range for 16-bit masks);
    * a lossless mask whose values are all small (e.g. 0/1/2) is a label map, not a binary mask: ValueError.
    """
    arr = collapse_channels(np.asarray(arr))
    if arr.dtype == bool:
        return arr
    values = np.unique(arr)
    if values.size == 1:  # empty (or completely filled) mask
        return np.full(arr.shape, bool(values[0] > 127 if lossy else values[0] > 0))
    if values.size == 2 and values[0] == 0:
        return arr > 0
    top = float(values[-1])
    if top > 255:
        return arr > top / 2
    if not lossy and top < 128:
        raise ValueError(f"mask values {values[:10].tolist()} look like a multi-class label map, not a binary mask")
    return arr > 127


def to_grey(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W). Grey images stored as RGB (BUSI) keep their exact values; true colour uses ITU-R 601 luma
    (the same weights as PIL's ``convert('L')``)."""
    if arr.ndim == 2:
        return arr
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    if np.array_equal(r, g) and np.array_equal(r, b):
        return np.ascontiguousarray(r)
    grey = 0.299 * r.astype(np.float64) + 0.587 * g + 0.114 * b
    return np.clip(np.round(grey), 0, np.iinfo(arr.dtype).max if arr.dtype.kind == "u" else None).astype(arr.dtype)


def to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    return arr


def resize_image(arr: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize to size x size (the usual 2D paper protocol; cv2.resize's default is bilinear too)."""
    from PIL import Image

    if arr.shape[:2] == (size, size):
        return arr
    if arr.dtype == np.uint8:
        return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))
    # 16-bit and other depths: resize each channel as float and cast back
    channels = [arr] if arr.ndim == 2 else [arr[..., c] for c in range(arr.shape[-1])]
    out = []
    for ch in channels:
        res = np.asarray(Image.fromarray(ch.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
        if arr.dtype.kind in "ui":
            info = np.iinfo(arr.dtype)
            res = np.clip(np.round(res), info.min, info.max)
        out.append(res.astype(arr.dtype))
    return out[0] if arr.ndim == 2 else np.stack(out, axis=-1)


def resize_labels(seg: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if seg.shape[:2] == (size, size):
        return seg
    return np.asarray(Image.fromarray(seg.astype(np.uint8)).resize((size, size), Image.NEAREST))


def write_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    arr = np.ascontiguousarray(arr)
    if arr.dtype == np.uint16 and arr.ndim == 2:
        im = Image.fromarray(arr, mode="I;16")
    elif arr.dtype == np.uint16:
        # PIL cannot write 16-bit RGB PNGs; fall back to an exact 8-bit copy when the data fit
        if arr.max() > 255:
            raise ValueError("16-bit RGB images are not supported; convert them to 8-bit first")
        im = Image.fromarray(arr.astype(np.uint8))
    else:
        im = Image.fromarray(arr)
    im.save(str(path), format="PNG", compress_level=3)


def normalise_image_dtype(arr: np.ndarray) -> np.ndarray:
    """PNG stores uint8 / uint16; bring anything else there without losing information where possible."""
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind in "iu" and arr.min() >= 0 and arr.max() <= 65535:
        return arr.astype(np.uint8 if arr.max() <= 255 else np.uint16)
    raise ValueError(f"unsupported pixel type {arr.dtype} (range {arr.min()}..{arr.max()}); PNG holds 8/16-bit only")


def case_problem_for_sizes(image: Path, image_hw: Tuple[int, int], mask: Path,
                           mask_hw: Tuple[int, int]) -> Optional[str]:
    if tuple(image_hw) != tuple(mask_hw):
        return (f"size mismatch: image {image} is {image_hw[1]}x{image_hw[0]} (WxH) but mask {mask} is "
                f"{mask_hw[1]}x{mask_hw[0]}")
    return None
