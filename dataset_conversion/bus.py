"""BUS dataset B (UDIAT; Yap et al. 2017): ``BUS_Dataset_B/original/000001.png`` and ``GT/000001.png``.

Grey, one channel, the same label map as BUSI so a BUSI model predicts it zero-shot. For the 562-image BUSIS set the
paper cites, use ``nnunetv2_lgms convert folder`` with ``--channels grey`` and ``--label-name tumor``.
"""
from __future__ import annotations

from pathlib import Path

from .busi import SPEC as _BUSI
from .core import DatasetSpec, Discovery, find_folder_pair, sanitize_case_id

SPEC = DatasetSpec(
    key="bus", title="BUS_B", default_id=514, dim=2, channels="grey", grey_channel_name="US",
    labels=dict(_BUSI.labels),
    description="BUS dataset B (UDIAT) breast ultrasound; same labels and channels as BUSI (zero-shot target).",
    reference="http://www2.docm.mmu.ac.uk/STAFF/m.yap/dataset.php",
    citation="Yap et al., Automated breast ultrasound lesions detection using CNNs, IEEE JBHI 2018",
    licence="research use on request from the authors",
    layout_hint="BUS_Dataset_B/original/000001.png and BUS_Dataset_B/GT/000001.png",
    zero_shot_source="busi",
)


def case_id(stem: str) -> str:
    return "bus_" + sanitize_case_id(stem)


def find_cases(source: Path, options: dict) -> Discovery:
    return find_folder_pair(source, "original", "GT", ["BUS_Dataset_B", "BUS"], "BUS_Dataset_B", case_id)
