"""BTCV, Multi-Atlas Labeling Beyond the Cranial Vault, Abdomen (Synapse) ``RawData``.

Layout: ``RawData/Training/img/img0001.nii.gz``, ``RawData/Training/label/label0001.nii.gz`` (30 labelled cases) and
``RawData/Testing/img/img0061.nii.gz`` (20 unlabelled, written to imagesTs). Images are copied byte for byte (spacing,
origin, direction, int16 kept); labels are checked (integers 0..13) and written as uint8 with the image's geometry.
13 organs. ``--paper-splits`` writes the common 24/6 split (validation img0035-img0040, MONAI ``dataset_0.json``,
used by Swin UNETR and LGMSNet) as the single fold 0.
"""
from __future__ import annotations

import re
from pathlib import Path

from . import nifti
from .core import Case, CaseProblem, ConversionError, DatasetSpec, Discovery, Problem, find_root

ORGANS = ["spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
          "inferior_vena_cava", "portal_and_splenic_vein", "pancreas", "right_adrenal_gland", "left_adrenal_gland"]
SPEC = DatasetSpec(
    key="btcv", title="BTCV", default_id=505, dim=3, channels="CT", file_ending=".nii.gz",
    labels={"background": 0, **{o: i + 1 for i, o in enumerate(ORGANS)}},
    description="BTCV abdomen CT, 13 organs (30 labelled training cases; 20 test cases in imagesTs).",
    reference="https://www.synapse.org/#!Synapse:syn3193805/wiki/217789",
    citation="Landman et al., MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault workshop and challenge",
    licence="Synapse terms of use (registration required)",
    layout_hint="RawData/Training/img/img0001.nii.gz and RawData/Training/label/label0001.nii.gz",
)
VAL_24_6 = [f"btcv_{i:04d}" for i in range(35, 41)]
_NUM = re.compile(r"^(img|label)(\d+)$")


def case_id(stem: str) -> str:
    m = _NUM.match(stem)
    if not m:
        raise ValueError(stem)
    return f"btcv_{int(m.group(2)):04d}"


def _nifti_files(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_file() and nifti.is_nifti(p)) if folder.is_dir() else []


def find_cases(source: Path, options: dict) -> Discovery:
    root = find_root(source, "Training", ["RawData", "Abdomen/RawData"])
    img_dir, lab_dir = root / "Training" / "img", root / "Training" / "label"
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise ConversionError(f"{d} not found: pass the BTCV RawData folder (it holds Training/img, "
                                  f"Training/label and Testing/img)")
    cases, problems = [], []
    labels = {}
    for f in _nifti_files(lab_dir):
        try:
            labels[case_id(nifti.nifti_stem(f))] = f
        except ValueError:
            problems.append(Problem(f"unexpected file name {f} (expected labelNNNN.nii.gz)"))
    image_ids = set()
    for sub, subset in ((img_dir, "Tr"), (root / "Testing" / "img", "Ts")):
        for f in _nifti_files(sub):
            stem = nifti.nifti_stem(f)
            try:
                cid = case_id(stem)
            except ValueError:
                problems.append(Problem(f"unexpected file name {f} (expected imgNNNN.nii.gz)"))
                continue
            masks = [labels[cid]] if subset == "Tr" and cid in labels else []
            if subset == "Tr":
                image_ids.add(cid)
                if not masks:
                    problems.append(Problem(f"missing label: no label{cid[5:]}.nii.gz in {lab_dir} for {f} "
                                            f"(add it or remove the image)", case_id=cid))
            cases.append(Case(cid, f, masks, subset=subset, source_name=stem))
    for cid, f in labels.items():
        if cid not in image_ids:
            problems.append(Problem(f"label without image: {f} has no img{cid[5:]}.nii.gz in {img_dir}"))
    return Discovery(cases, problems)


def check_case(case: Case):
    try:
        g = nifti.geometry(case.image)
    except Exception as e:
        return f"unreadable image {case.image}: {e} (replace the file or remove the case)"
    for m in case.masks:
        try:
            gm = nifti.geometry(m)
        except Exception as e:
            return f"unreadable label {m}: {e} (replace the file or remove the case)"
        problem, _ = nifti.compare(g, gm)
        if problem:
            return f"image {case.image} and label {m} do not share a grid: {problem} (fix or remove the case)"
    return None


def convert_case(case: Case, out_dir: Path, settings: dict) -> dict:
    try:
        nifti.copy_or_convert(case.image, out_dir / f"images{case.subset}" / f"{case.case_id}_0000.nii.gz")
    except Exception as e:
        raise CaseProblem(f"unreadable image {case.image}: {e}")
    info = {}
    for m in case.masks:
        try:
            info["labels"] = nifti.write_labels(m, out_dir / f"labels{case.subset}" / f"{case.case_id}.nii.gz",
                                                len(ORGANS), nifti.geometry(case.image))
        except ValueError as e:
            raise CaseProblem(str(e))
        except Exception as e:
            raise CaseProblem(f"unreadable label {m}: {e}")
    return info


def paper_splits(case_ids):
    present = set(case_ids)
    missing = [c for c in VAL_24_6 if c not in present]
    if missing or len(present) != 30:
        raise ConversionError(f"--paper-splits (BTCV 24/6): needs the 30 labelled training cases with validation "
                              f"img0035-img0040; found {len(present)} cases, missing {missing}")
    return [{"train": sorted(present - set(VAL_24_6)), "val": list(VAL_24_6)}]
