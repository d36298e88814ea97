"""BUSI, Breast Ultrasound Images (Al-Dhabyani et al., Data in Brief 2020).

Layout: ``Dataset_BUSI_with_GT/{benign,malignant,normal}/benign (12).png`` + ``benign (12)_mask.png`` and extra masks
``benign (12)_mask_1.png`` ... which are OR-ed with the main one. Mask modes vary (1-bit, RGBA and RGB 0/255).
Images are grey ultrasound stored as RGB: written as one grey channel. Case IDs: ``benign (12)`` -> ``benign_12``.
The LGMSNet paper uses benign + malignant (647 cases); ``--include-normal`` adds the 133 normal cases (empty masks).
The release contains a few duplicated images; they are kept, as in the paper's split lists.
"""
from __future__ import annotations

import re
from pathlib import Path

from .core import (Case, ConversionError, DatasetSpec, Discovery, Problem, find_root, list_files, sanitize_case_id)

SPEC = DatasetSpec(
    key="busi", title="BUSI", default_id=501, dim=2, channels="grey", grey_channel_name="US",
    labels={"background": 0, "tumor": 1},
    description="BUSI breast ultrasound: benign + malignant (+ normal with --include-normal); multi-masks OR-ed.",
    reference="https://scholar.cu.edu.eg/?q=afahmy/pages/dataset",
    citation="Al-Dhabyani et al., Dataset of breast ultrasound images, Data in Brief 28 (2020) 104863",
    licence="research use; cite the paper",
    layout_hint="Dataset_BUSI_with_GT/{benign,malignant,normal}/'benign (1).png' + 'benign (1)_mask.png'",
)
SPLIT_PREFIX = "busi"
_MASK = re.compile(r"^(?P<stem>.+?)_mask(?:_(?P<n>\d+))?$")


def split_case_id(name: str) -> str:
    return sanitize_case_id(name)


def find_cases(source: Path, options: dict) -> Discovery:
    root = find_root(source, "benign", ["Dataset_BUSI_with_GT"])
    classes = ["benign", "malignant"] + (["normal"] if options.get("include_normal") else [])
    for cls in classes:
        if not (root / cls).is_dir():
            raise ConversionError(f"{root / cls} not found: pass the Dataset_BUSI_with_GT folder "
                                  f"(it holds benign/, malignant/ and normal/)")
    cases, problems = [], []
    for cls in classes:
        folder = root / cls
        images, masks = {}, {}
        for f in list_files(folder, (".png",)):
            m = _MASK.match(f.stem)
            if m:
                masks.setdefault(m.group("stem"), []).append((int(m.group("n") or 0), f))
            else:
                images[f.stem] = f
        for stem, img in sorted(images.items()):
            cid = sanitize_case_id(stem)
            ms = [f for _, f in sorted(masks.get(stem, []))]
            if not ms:
                problems.append(Problem(f"missing mask: no '{stem}_mask.png' in {folder} for image {img} "
                                        f"(add the mask or remove the image)", case_id=cid))
            cases.append(Case(cid, img, ms, source_name=stem))
        for stem, ms in sorted(masks.items()):
            if stem not in images:
                problems.append(Problem(f"mask without image: {ms[0][1]} has no image '{stem}.png' in {folder} "
                                        f"(add the image or remove the mask)"))
    return Discovery(cases, problems)
