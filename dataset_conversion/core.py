"""Shared skeleton of every converter. :func:`convert` runs the steps in order: :func:`validate` (arguments, source,
output location) -> :func:`discover` (the release layout) -> :func:`check_cases` (headers; nothing written so far)
-> :func:`plan_splits` -> :func:`write` (cases, ``dataset.json`` via nnU-Net's ``generate_dataset_json``, into a
temporary folder, then an atomic move into ``$nnUNet_raw``) -> :func:`write_splits` (``$nnUNet_preprocessed``).

A dataset module provides (every module of this package that defines ``SPEC`` is registered as a converter, named
``SPEC.key``; see ``__init__.py``):

* ``SPEC``: a :class:`DatasetSpec` (default ID, dataset name, labels, channels, ...);
* ``find_cases(source: Path, options: dict) -> Discovery``: reads the release layout, never writes;
* optionally ``check_case(case)`` (header-level check), ``convert_case(case, out_dir, settings)`` (default: the 2D
  PNG path below), ``prepare(cases, options)``, ``default_title(source)``, and for paper splits either
  ``SPLIT_PREFIX`` + ``split_case_id(name)`` (packaged case-name lists) or ``paper_splits(case_ids)``.

Dataset-specific CLI options are declared in ``nnunetv2_lgms/commands/convert.py`` (kept import-light) and arrive
here as keyword ``options``.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import io2d

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
RESIZED_ID_OFFSET = 50
MAX_LISTED = 25


class ConversionError(Exception):
    """An expected problem with the input or the output location. The message names the file(s) and the fix."""


class CaseProblem(Exception):
    """Raised inside a case conversion; becomes a listed problem (or a skipped case with ``skip_bad``)."""


@dataclass
class Case:
    case_id: str
    image: Path
    masks: List[Path] = field(default_factory=list)
    subset: str = "Tr"  # "Tr" -> imagesTr/labelsTr, "Ts" -> imagesTs/labelsTs
    source_name: str = ""  # the case name as the release spells it (used by split lists and messages)


@dataclass
class Problem:
    message: str
    case_id: Optional[str] = None  # None: a file-level problem (e.g. a mask without an image)


@dataclass
class Discovery:
    cases: List[Case]
    problems: List[Problem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


@dataclass
class DatasetSpec:
    key: str  # CLI name
    title: str  # DatasetNNN_<title>
    default_id: int
    dim: int  # 2 or 3
    channels: str  # "rgb", "grey" or a 3D channel name such as "CT"
    labels: Dict[str, object]
    grey_channel_name: str = "grey"
    regions_class_order: Optional[Tuple[int, ...]] = None
    file_ending: str = ".png"
    reader_writer: Optional[str] = None
    description: str = ""
    reference: str = ""
    licence: str = "see the dataset's release terms"
    citation: str = ""
    release: str = ""
    layout_hint: str = ""  # shown when the layout is not found
    zero_shot_source: Optional[str] = None  # e.g. "kvasir" for cvc-clinicdb

    def channel_names(self) -> Dict[int, str]:
        if self.channels == "rgb":
            return {0: "R", 1: "G", 2: "B"}
        if self.channels == "grey":
            return {0: self.grey_channel_name}
        return {0: self.channels}


@dataclass
class Result:
    path: Path
    dataset_id: int
    dataset_name: str
    num_training: int
    num_test: int
    skipped: List[str]
    splits_file: Optional[Path] = None
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------- helpers
def sanitize_case_id(name: str) -> str:
    """'benign (12)' -> 'benign_12': nnU-Net case IDs become file names and shell arguments; keep them plain."""
    out = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    if not out:
        raise ValueError(f"cannot make a case ID from {name!r}")
    return out


def list_files(folder: Path, suffixes: Sequence[str] = io2d.IMAGE_SUFFIXES) -> List[Path]:
    """Image files directly in ``folder`` (case-insensitive suffix match, hidden files and notes ignored)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)


def find_root(source: Path, marker: str, release_dirs: Sequence[str] = ()) -> Path:
    """Accept either the release folder itself or a folder above it: return the folder that contains ``marker``."""
    candidates = [source] + [source / d for d in release_dirs]
    for c in candidates:
        if (c / marker).exists():
            return c
    return source


def find_folder_pair(source: Path, image_folder: str, mask_folder: str, release_dirs: Sequence[str], what: str,
                     case_id_fn: Callable[[str], str]) -> Discovery:
    """The common release shape: a folder of images and a folder of masks, matched by file stem. ``what`` names the
    folder the user should pass, for the error message."""
    root = find_root(source, image_folder, release_dirs)
    img_dir, mask_dir = root / image_folder, root / mask_folder
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise ConversionError(f"{d} not found: pass {what} (it holds '{image_folder}' and '{mask_folder}')")
    return pair_by_stem(list_files(img_dir), list_files(mask_dir), img_dir, mask_dir, case_id_fn)


def pair_by_stem(images: List[Path], masks: List[Path], image_dir: Path, mask_dir: Path,
                 case_id_fn: Callable[[str], str], mask_stem_fn: Callable[[str], str] = lambda s: s,
                 subset: str = "Tr", require_masks: bool = True) -> Discovery:
    """Match images and masks by file stem; report missing masks, masks without image and duplicate stems."""
    problems: List[Problem] = []
    by_stem: Dict[str, List[Path]] = {}
    for m in masks:
        by_stem.setdefault(mask_stem_fn(m.stem), []).append(m)
    for stem, ms in by_stem.items():
        if len(ms) > 1:
            problems.append(Problem(f"several masks for one case: {', '.join(str(m) for m in ms)} "
                                    f"(keep one file per stem)", case_id=_safe_id(case_id_fn, stem)))
    cases = []
    image_stems = set()
    for img in images:
        image_stems.add(img.stem)
        ms = by_stem.get(img.stem, [])
        cid = _safe_id(case_id_fn, img.stem)
        cases.append(Case(cid, img, ms[:1], subset=subset, source_name=img.stem))
        if not ms and require_masks:
            problems.append(Problem(f"missing mask: no file named {img.stem}.* in {mask_dir} for image {img} "
                                    f"(add the mask or remove the image)", case_id=cid))
    for stem, ms in by_stem.items():
        if stem not in image_stems:
            problems.append(Problem(f"mask without image: {ms[0]} has no image named {stem}.* in {image_dir} "
                                    f"(add the image or remove the mask)"))
    return Discovery(cases, problems)


def _safe_id(fn: Callable[[str], str], stem: str) -> str:
    try:
        return fn(stem)
    except ValueError:
        return stem


def read_split_list(name: str) -> List[str]:
    path = SPLITS_DIR / name
    if not path.is_file():
        raise ConversionError(f"split list {path} is missing from the installed package (reinstall nnunetv2_lgms)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def paper_splits_from_lists(prefix: str, case_ids: Sequence[str], to_case_id: Callable[[str], str],
                            n: int = 3) -> List[Dict[str, List[str]]]:
    """The LGMSNet paper's n train/val splits as nnU-Net ``splits_final.json`` entries (fold k = split k+1)."""
    present = set(case_ids)
    splits, missing = [], []
    for k in range(1, n + 1):
        train = [to_case_id(x) for x in read_split_list(f"{prefix}_train{k}.txt")]
        val = [to_case_id(x) for x in read_split_list(f"{prefix}_val{k}.txt")]
        missing += [c for c in train + val if c not in present]
        splits.append({"train": sorted(train), "val": sorted(val)})
    if missing:
        missing = sorted(set(missing))
        raise ConversionError(
            f"--paper-splits: {len(missing)} case(s) of the paper's split lists are not in the converted data, e.g. "
            f"{', '.join(missing[:10])}. Convert the complete release (and do not skip those cases), or leave out "
            f"--paper-splits to let nnU-Net make its own 5-fold split.")
    return splits


def nnunet_dir(env_var: str, override: Optional[Path] = None) -> Optional[Path]:
    """One of nnU-Net's folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``) as nnU-Net itself
    sees it, through ``nnunetv2.paths`` (read when called, not at import); None when unset or empty. ``override``
    (an explicit folder) wins."""
    if override is not None:
        return Path(override)
    from nnunetv2 import paths

    value = getattr(paths, env_var).get()  # nnU-Net 2.8: a lazy _EnvPath; get() is None when the variable is unset
    return Path(value) if value else None


def _other_datasets_with_id(folder: Optional[Path], dataset_id: int, name: str) -> List[Path]:
    if folder is None or not folder.is_dir():
        return []
    prefix = f"Dataset{dataset_id:03d}_"
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(prefix) and p.name != name)


def format_problems(problems: List[Problem]) -> str:
    lines = [f"  - {p.message}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- default 2D steps
def check_case_2d(case: Case) -> Optional[str]:
    """Header-level check (no decoding): readable files, equal image and mask sizes."""
    try:
        hw = io2d.image_size(case.image)
    except Exception as e:
        return f"unreadable image {case.image}: {e} (replace the file or remove the case)"
    for m in case.masks:
        try:
            mhw = io2d.image_size(m)
        except Exception as e:
            return f"unreadable mask {m}: {e} (replace the file or remove the case)"
        msg = io2d.case_problem_for_sizes(case.image, hw, m, mhw)
        if msg:
            return msg + " (fix or remove the case)"
    return None


def convert_case_2d(case: Case, out_dir: Path, settings: dict) -> dict:
    try:
        img = io2d.read_image(case.image)
        img = io2d.to_grey(img) if settings["channels"] == "grey" else io2d.to_rgb(img)
        img = io2d.normalise_image_dtype(img)
    except Exception as e:
        raise CaseProblem(f"unreadable image {case.image}: {e}")
    seg = None
    label_values = settings.get("label_values")
    for m in case.masks:
        try:
            raw = io2d.read_mask(m)
        except Exception as e:
            raise CaseProblem(f"unreadable mask {m}: {e}")
        try:
            if label_values is not None:
                part = map_label_values(io2d.collapse_channels(raw), label_values)
            else:
                part = io2d.binarize(raw, lossy=m.suffix.lower() in io2d.LOSSY_SUFFIXES).astype(np.uint8)
        except ValueError as e:
            raise CaseProblem(f"mask {m}: {e}")
        if part.shape != img.shape[:2]:
            raise CaseProblem(io2d.case_problem_for_sizes(case.image, img.shape[:2], m, part.shape))
        seg = part if seg is None else np.maximum(seg, part)  # several masks of one case are OR-ed
    if settings.get("resize"):
        img = io2d.resize_image(img, settings["resize"])
        if seg is not None:
            seg = io2d.resize_labels(seg, settings["resize"])
    io2d.write_png(img, out_dir / f"images{case.subset}" / f"{case.case_id}_0000.png")
    info = {"shape": list(img.shape[:2])}
    if seg is not None:
        io2d.write_png(seg.astype(np.uint8), out_dir / f"labels{case.subset}" / f"{case.case_id}.png")
        info["labels"] = [int(v) for v in np.unique(seg)]
    return info


def map_label_values(arr: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Map raw mask values (sorted list ``label_values``, index = nnU-Net label) to consecutive labels 0..K."""
    lut = {int(v): i for i, v in enumerate(label_values)}
    vals = np.unique(arr)
    unknown = [int(v) for v in vals if int(v) not in lut]
    if unknown:
        raise ValueError(f"unexpected mask values {unknown[:10]}")
    out = np.zeros(arr.shape, dtype=np.uint8)
    for v in vals:
        out[arr == v] = lut[int(v)]
    return out


def _work(job) -> Tuple[str, Optional[str], dict]:
    module_name, case, out_dir, settings = job
    module = importlib.import_module(module_name)
    fn = getattr(module, "convert_case", convert_case_2d)
    try:
        return case.case_id, None, fn(case, out_dir, settings) or {}
    except CaseProblem as e:
        return case.case_id, str(e), {}
    except Exception as e:  # anything unexpected still names the case and its files
        files = ", ".join(str(p) for p in [case.image, *case.masks])
        return case.case_id, f"case {case.case_id} ({files}): {type(e).__name__}: {e}", {}


def _run_jobs(jobs: list, num_workers: int, progress: bool, desc: str) -> List[Tuple[str, Optional[str], dict]]:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress, file=sys.stderr)
    results = []
    try:
        if num_workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(_work(job))
                bar.update()
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=num_workers) as ex:
                futures = [ex.submit(_work, job) for job in jobs]
                for f in as_completed(futures):
                    results.append(f.result())
                    bar.update()
    finally:
        bar.close()
    return results


# --------------------------------------------------------------------------------------------------------- pipeline
# convert() = validate -> discover -> check_cases -> plan_splits -> write -> write_splits. Every step before write()
# only reads; write() builds the dataset in a hidden temporary folder inside nnUNet_raw and moves it into place only
# when it is complete, so a failure at any point leaves nnUNet_raw as it was.
def dataset_folder_name(spec: DatasetSpec, dataset_id: Optional[int], resize: Optional[int],
                        title: Optional[str] = None) -> Tuple[int, str]:
    if dataset_id is None:
        dataset_id = spec.default_id + (RESIZED_ID_OFFSET if resize else 0)
    if not 1 <= int(dataset_id) <= 999:
        raise ConversionError(f"dataset ID {dataset_id} is outside 1..999 (nnU-Net uses three digits)")
    title = title or spec.title
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", title):
        raise ConversionError(f"dataset name {title!r} may contain only letters, digits, '_' and '-'")
    if resize:
        title = f"{title}_{resize}px"
    return int(dataset_id), f"Dataset{int(dataset_id):03d}_{title}"


@dataclass
class Request:
    """A validated conversion request (the output of :func:`validate`): the converter, the release folder, the
    options, and the dataset's ID, name and nnU-Net folders."""
    module: object
    spec: DatasetSpec
    source: Path
    raw: Path  # nnUNet_raw (may not exist yet)
    pre: Optional[Path]  # nnUNet_preprocessed, None when unset
    dataset_id: int
    name: str  # DatasetNNN_Title
    resize: Optional[int] = None
    paper_splits: bool = False
    overwrite: bool = False
    skip_bad: bool = False
    options: dict = field(default_factory=dict)  # dataset-specific options, handed to find_cases/prepare/convert_case

    @property
    def target(self) -> Path:
        return self.raw / self.name


@dataclass
class Selection:
    """The cases to convert after the header checks (the output of :func:`check_cases`), with what the writer
    needs: the spec (channels possibly chosen by the module's ``prepare``), per-case settings and the labels."""
    cases: List[Case]
    spec: DatasetSpec
    settings: dict  # handed to every convert_case(case, out_dir, settings)
    labels: dict
    skipped: List[str] = field(default_factory=list)  # messages of the cases left out (skip_bad)
    notes: List[str] = field(default_factory=list)


@dataclass
class Written:
    """What :func:`write` put into ``nnUNet_raw``: the converted cases and the paper splits without failed cases."""
    cases: List[Case]
    skipped: List[str]
    splits: Optional[List[Dict[str, List[str]]]]

    @property
    def num_training(self) -> int:
        return sum(c.subset == "Tr" for c in self.cases)

    @property
    def num_test(self) -> int:
        return sum(c.subset == "Ts" for c in self.cases)


def validate(module, source, *, dataset_id: Optional[int] = None, resize: Optional[int] = None,
             paper_splits: bool = False, overwrite: bool = False, skip_bad: bool = False,
             raw_dir: Optional[Path] = None, preprocessed_dir: Optional[Path] = None,
             options: Optional[dict] = None) -> Request:
    """Step 1: check the arguments, the source folder and the output location; reads no case and writes nothing.

    Raises :class:`ConversionError` for a missing or non-folder source, ``resize`` on 3D data or outside 8..8192,
    ``paper_splits`` for a dataset without published splits, unset ``nnUNet_raw``, an invalid ID or name, an ID used
    by another dataset in nnUNet_raw/preprocessed/results, or an existing target without ``overwrite``."""
    spec: DatasetSpec = module.SPEC
    options = dict(options or {})
    source = Path(source).expanduser()
    if not source.exists():
        raise ConversionError(f"source folder {source} does not exist")
    if not source.is_dir():
        raise ConversionError(f"source {source} is not a folder: pass the extracted release folder")
    if resize is not None:
        if spec.dim != 2:
            raise ConversionError(f"--resize applies to 2D datasets only; {spec.key} is 3D (nnU-Net resamples 3D "
                                  f"data to its own target spacing)")
        if not 8 <= int(resize) <= 8192:
            raise ConversionError(f"--resize {resize}: expected a side length between 8 and 8192 pixels")
    if paper_splits and not has_paper_splits(module):
        raise ConversionError(f"--paper-splits: the LGMSNet paper published no split for {spec.key} "
                              f"(available for {_datasets_with_paper_splits()})")

    raw = nnunet_dir("nnUNet_raw", raw_dir)
    if raw is None:
        raise ConversionError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (see nnU-Net's "
                              "documentation/setting_up_paths.md)")
    pre = nnunet_dir("nnUNet_preprocessed", preprocessed_dir)
    results_dir = nnunet_dir("nnUNet_results", None)

    title = options.get("title") or (module.default_title(source) if hasattr(module, "default_title") else None)
    dataset_id, name = dataset_folder_name(spec, dataset_id, resize, title)
    for folder in (raw, pre, results_dir):
        others = _other_datasets_with_id(folder, dataset_id, name)
        if others:
            raise ConversionError(f"dataset ID {dataset_id} is already used by {others[0]}; nnU-Net needs one name "
                                  f"per ID. Pass --id N with a free ID (or remove that dataset).")
    if (raw / name).exists() and not overwrite:
        raise ConversionError(f"{raw / name} already exists; pass --overwrite to replace it (or --id N for a new ID)")
    return Request(module, spec, source, raw, pre, dataset_id, name, resize, paper_splits, overwrite, skip_bad,
                   options)


def has_paper_splits(module) -> bool:
    """Whether ``--paper-splits`` applies: the module ships split lists (``SPLIT_PREFIX``) or computes them."""
    return hasattr(module, "paper_splits") or hasattr(module, "SPLIT_PREFIX")


def _datasets_with_paper_splits() -> str:
    """'busi, isic2018, tnscui and btcv': the registered converters that have paper splits."""
    from . import converters, get_module

    names = [key for key in converters() if has_paper_splits(get_module(key))]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def discover(request: Request, limit: Optional[int] = None) -> Discovery:
    """Step 2: read the release layout with the module's ``find_cases`` (file names only; nothing decoded, nothing
    written). Returns the cases in (subset, case ID) order; layout problems (missing masks, masks without image)
    and duplicate case IDs are listed as problems. ``limit`` (tests, debugging) keeps the first N cases.

    Raises :class:`ConversionError` when the layout is not found or holds no case."""
    spec = request.spec
    discovery: Discovery = request.module.find_cases(request.source, request.options)
    cases = sorted(discovery.cases, key=lambda c: (c.subset, c.case_id))
    if not cases:
        raise ConversionError(f"no cases found in {request.source}. Expected the {spec.key} release layout: "
                              f"{spec.layout_hint or 'see --help'}")
    problems = list(discovery.problems)
    seen: Dict[str, Case] = {}
    for c in cases:
        if c.case_id in seen:
            problems.append(Problem(f"duplicate case name {c.case_id!r}: {seen[c.case_id].image} and {c.image} "
                                    f"(rename one of them)", case_id=c.case_id))
        else:
            seen[c.case_id] = c
    if limit is not None:  # test/debug aid: the first N cases in name order
        keep = {c.case_id for c in cases[:limit]}
        cases = [c for c in cases if c.case_id in keep]
        problems = [p for p in problems if p.case_id in keep]
    return Discovery(cases, problems, list(discovery.notes))


def check_cases(request: Request, discovery: Discovery) -> Selection:
    """Step 3: header-level checks of every case (the module's ``check_case``; 2D default: readable files, equal
    image and mask sizes) and the module's ``prepare`` (settings found over the whole set, e.g. channels). Nothing is
    written.

    With problems, raises :class:`ConversionError` listing them, or with ``skip_bad`` leaves those cases out (and
    raises when no training case remains)."""
    module, spec, source = request.module, request.spec, request.source
    cases, problems = list(discovery.cases), list(discovery.problems)
    check = getattr(module, "check_case", check_case_2d if spec.dim == 2 else None)
    if check is not None:
        already_bad = {p.case_id for p in problems}
        for c in cases:
            if c.case_id in already_bad:
                continue
            msg = check(c)
            if msg:
                problems.append(Problem(msg, case_id=c.case_id))
    settings = {"channels": spec.channels, "resize": request.resize, **request.options}
    if hasattr(module, "prepare"):
        extra, case_problems = module.prepare(cases, request.options)
        settings.update(extra)
        problems += case_problems
    if settings["channels"] != spec.channels:
        spec = replace(spec, channels=settings["channels"])
    skipped: List[str] = []
    if problems:
        if not request.skip_bad:
            raise ConversionError(f"{len(problems)} problem(s) in {source}; nothing was written:\n"
                                  f"{format_problems(problems)}\nFix the files, or pass --skip-bad to convert the "
                                  f"remaining cases and list what was skipped.")
        bad = {p.case_id for p in problems if p.case_id is not None}
        skipped = [p.message for p in problems]
        cases = [c for c in cases if c.case_id not in bad]
        if not [c for c in cases if c.subset == "Tr"]:
            raise ConversionError(f"every case in {source} has a problem; nothing was written:\n"
                                  f"{format_problems(problems)}")
    labels = settings.pop("labels_override", None) or dict(spec.labels)
    return Selection(cases, spec, settings, labels, skipped, list(discovery.notes))


def plan_splits(request: Request, cases: Sequence[Case]) -> Optional[List[Dict[str, List[str]]]]:
    """Step 4, before writing: the paper's splits of the training ``cases`` (None without ``paper_splits``), from
    the module's ``paper_splits(case_ids)`` or its packaged lists (``SPLIT_PREFIX``). Raises
    :class:`ConversionError` when split cases are missing, or when ``nnUNet_preprocessed`` already holds a
    different ``splits_final.json`` for this dataset and ``overwrite`` is off."""
    if not request.paper_splits:
        return None
    module = request.module
    train_ids = [c.case_id for c in cases if c.subset == "Tr"]
    if hasattr(module, "paper_splits"):
        splits = module.paper_splits(train_ids)
    else:
        splits = paper_splits_from_lists(module.SPLIT_PREFIX, train_ids, module.split_case_id)
    if request.pre is not None:
        existing = request.pre / request.name / "splits_final.json"
        if existing.exists() and not request.overwrite and json.loads(existing.read_text()) != splits:
            raise ConversionError(f"{existing} exists with a different split; pass --overwrite to replace it")
    return splits


def write(request: Request, selection: Selection, splits: Optional[List[Dict[str, List[str]]]] = None,
          num_workers: int = 1, progress: bool = True) -> Written:
    """Step 5: convert every case into a hidden temporary folder inside ``nnUNet_raw``, add ``dataset.json``,
    ``conversion_info.json`` and (with splits) ``splits_final.json``, then move the folder into place, replacing
    an existing dataset only now. On any error the temporary folder is removed and ``nnUNet_raw`` is unchanged.

    A case whose conversion fails raises :class:`ConversionError` listing it, or with ``skip_bad`` is left out
    (its files removed, its ID dropped from the splits)."""
    raw, name = request.raw, request.name
    raw.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=raw))
    try:
        cases, failed = _convert_cases(tmp, request, selection, num_workers, progress)
        skipped = selection.skipped + [m for _, m in failed]
        if failed and splits is not None:
            bad = {cid for cid, _ in failed}
            splits = [{k: [x for x in v if x not in bad] for k, v in s.items()} for s in splits]
        written = Written(cases, skipped, splits)
        if written.num_training == 0:
            raise ConversionError(f"no training case could be converted from {request.source}; nothing was written")
        _write_metadata(tmp, request, selection, written)
        _move_into_place(tmp, request.target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return written


def _convert_cases(tmp: Path, request: Request, selection: Selection, num_workers: int,
                   progress: bool) -> Tuple[List[Case], List[Tuple[str, str]]]:
    """Run convert_case for every case into ``tmp``; returns the converted cases and (case ID, message) of the
    failed ones (skip_bad; their partial files removed). Empty test folders are dropped."""
    spec, cases = selection.spec, selection.cases
    subsets = sorted({c.subset for c in cases})
    for s in subsets:
        (tmp / f"images{s}").mkdir()
        (tmp / f"labels{s}").mkdir()
    jobs = [(request.module.__name__, c, tmp, selection.settings) for c in cases]
    outcome = _run_jobs(jobs, num_workers, progress, f"{spec.key} -> {request.name}")
    failed = [(cid, msg) for cid, msg, _ in outcome if msg]
    if failed:
        if not request.skip_bad:
            raise ConversionError(f"{len(failed)} case(s) could not be converted; nothing was written:\n"
                                  f"{format_problems([Problem(m, cid) for cid, m in failed])}\nFix the files, "
                                  f"or pass --skip-bad to convert the remaining cases.")
        bad = {cid for cid, _ in failed}
        for c in cases:
            if c.case_id in bad:
                for f in (tmp / f"images{c.subset}").glob(f"{c.case_id}_[0-9][0-9][0-9][0-9]{spec.file_ending}"):
                    f.unlink()
                lf = tmp / f"labels{c.subset}" / f"{c.case_id}{spec.file_ending}"
                if lf.exists():
                    lf.unlink()
        cases = [c for c in cases if c.case_id not in bad]
    for s in subsets:  # nnU-Net treats a missing labelsTs as "no test labels"; drop empty folders
        for sub in (f"images{s}", f"labels{s}"):
            if s != "Tr" and not any((tmp / sub).iterdir()):
                (tmp / sub).rmdir()
    return cases, failed


def _write_metadata(folder: Path, request: Request, selection: Selection, written: Written) -> None:
    """``dataset.json`` (nnU-Net's generate_dataset_json), ``conversion_info.json`` (source, options, every case's
    source files, skipped cases) and, with paper splits, ``splits_final.json``."""
    _write_dataset_json(folder, selection.spec, selection.labels, written.num_training, request.name,
                        request.source, request.resize, request.options)
    options = request.options
    info = {
        "converter": f"nnunetv2_lgms convert {selection.spec.key}",
        "source": str(request.source.resolve()),
        "options": {"resize": request.resize, "paper_splits": request.paper_splits, "skip_bad": request.skip_bad,
                    **{k: v for k, v in options.items() if isinstance(v, (str, int, float, bool, type(None)))}},
        "cases": {c.case_id: {"subset": c.subset, "image": str(c.image), "masks": [str(m) for m in c.masks]}
                  for c in written.cases},
        "skipped": written.skipped,
    }
    (folder / "conversion_info.json").write_text(json.dumps(info, indent=1))
    if written.splits is not None:
        (folder / "splits_final.json").write_text(json.dumps(written.splits, indent=1))


def _move_into_place(tmp: Path, target: Path) -> None:
    """Replace ``target`` by the complete ``tmp`` (same file system): the old dataset is moved aside first and
    deleted only once the new one is in place."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_splits(request: Request, splits: Optional[List[Dict[str, List[str]]]]) -> Tuple[Optional[Path], List[str]]:
    """Step 6, after the dataset is in place: write the paper splits to
    ``$nnUNet_preprocessed/DatasetNNN_Name/splits_final.json`` (where nnU-Net reads them when training starts).
    Returns that file (None when not written) and notes for the user: how to copy the splits when
    ``nnUNet_preprocessed`` is unset, an older splits file that nnU-Net would keep using, or preprocessed data of a
    replaced dataset."""
    pre, name, target = request.pre, request.name, request.target
    notes: List[str] = []
    splits_file = None
    if splits is not None:
        if pre is not None:
            (pre / name).mkdir(parents=True, exist_ok=True)
            splits_file = pre / name / "splits_final.json"
            splits_file.write_text(json.dumps(splits, indent=1))
        else:
            notes.append(f"nnUNet_preprocessed is not set: copy {target / 'splits_final.json'} to "
                         f"$nnUNet_preprocessed/{name}/splits_final.json before training")
    elif pre is not None and (pre / name / "splits_final.json").exists():
        notes.append(f"{pre / name / 'splits_final.json'} already exists from an earlier run; nnU-Net will keep "
                     f"using it. Delete it if the case list changed.")
    if request.overwrite and pre is not None and (pre / name / "dataset_fingerprint.json").exists():
        notes.append(f"{pre / name} holds preprocessed data of the previous conversion: rerun "
                     f"nnUNetv2_plan_and_preprocess -d {request.dataset_id}")
    return splits_file, notes


def convert(module, source, *, dataset_id: Optional[int] = None, resize: Optional[int] = None,
            paper_splits: bool = False, overwrite: bool = False, num_workers: int = 1, skip_bad: bool = False,
            limit: Optional[int] = None, raw_dir: Optional[Path] = None, preprocessed_dir: Optional[Path] = None,
            progress: bool = True, log: Callable[[str], None] = print, **options) -> Result:
    """Convert the release in ``source`` with the converter ``module`` into ``$nnUNet_raw/DatasetNNN_Name``.

    Nothing is written unless every case converts (``skip_bad``: the others are converted and the skipped ones
    listed in the result); ``overwrite`` replaces an existing dataset of that name. ``raw_dir`` and
    ``preprocessed_dir`` override nnU-Net's ``nnUNet_raw`` and ``nnUNet_preprocessed``."""
    request = validate(module, source, dataset_id=dataset_id, resize=resize, paper_splits=paper_splits,
                       overwrite=overwrite, skip_bad=skip_bad, raw_dir=raw_dir, preprocessed_dir=preprocessed_dir,
                       options=options)
    selection = check_cases(request, discover(request, limit))
    splits = plan_splits(request, selection.cases)
    written = write(request, selection, splits, num_workers=num_workers, progress=progress)
    splits_file, notes = write_splits(request, written.splits)
    return Result(request.target, request.dataset_id, request.name, written.num_training, written.num_test,
                  written.skipped, splits_file, selection.notes + notes)


def _write_dataset_json(folder: Path, spec: DatasetSpec, labels: dict, n_train: int, name: str, source: Path,
                        resize: Optional[int], options: dict) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    description = spec.description
    if resize:
        description += f" Every image and mask resized to {resize}x{resize} (images bilinear, masks nearest)."
    kwargs = {}
    if spec.zero_shot_source:
        kwargs["zero_shot_source"] = spec.zero_shot_source
    generate_dataset_json(
        str(folder), channel_names=spec.channel_names(), labels=dict(labels), num_training_cases=n_train,
        file_ending=spec.file_ending, regions_class_order=spec.regions_class_order, dataset_name=name,
        reference=spec.reference or None, release=spec.release or None, description=description or None,
        overwrite_image_reader_writer=spec.reader_writer, license=spec.licence,
        converted_by="nnunetv2_lgms convert " + spec.key, **kwargs)
    if spec.citation:  # generate_dataset_json 2.8.1 writes `release` into `citation`; set it properly
        path = folder / "dataset.json"
        dj = json.loads(path.read_text())
        dj["citation"] = spec.citation
        if not spec.release:
            dj.pop("release", None)
        path.write_text(json.dumps(dj, indent=4))
