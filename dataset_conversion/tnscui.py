"""TN-SCUI 2020 thyroid nodule segmentation: ``image/1.PNG``, ``mask/1.PNG``, ``train.csv`` (ID, CATE).

Grey ultrasound, masks 0/255 -> 0/1. Case IDs: ``1.PNG`` -> ``tnscui_1`` (the paper's split lists use the bare IDs).
"""
from __future__ import annotations

from pathlib import Path

from .core import DatasetSpec, Discovery, find_folder_pair, sanitize_case_id

SPEC = DatasetSpec(
    key="tnscui", title="TNSCUI2020", default_id=504, dim=2, channels="grey", grey_channel_name="US",
    labels={"background": 0, "nodule": 1},
    description="TN-SCUI 2020 thyroid nodule segmentation (training set).",
    reference="https://tn-scui2020.grand-challenge.org/",
    citation="Zhou et al., TN-SCUI 2020 challenge (MICCAI 2020)",
    licence="challenge data terms (research use)",
    layout_hint="image/1.PNG ..., mask/1.PNG ..., train.csv",
)
SPLIT_PREFIX = "tuscui"  # the published file names say 'tuscui'


def split_case_id(name: str) -> str:
    return "tnscui_" + sanitize_case_id(name)


def find_cases(source: Path, options: dict) -> Discovery:
    return find_folder_pair(source, "image", "mask", ["tn-scui2020", "TN-SCUI2020", "TNSCUI2020_train", "train"],
                            "the TN-SCUI 2020 training folder", split_case_id)
