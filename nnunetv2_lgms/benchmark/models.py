"""Datasets, plans, trainer classes and networks, resolved exactly as nnU-Net resolves them."""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nnunetv2_lgms.discovery import ENV_VAR, ext_trainer_value, shim_on_path


# how the benchmarks run the networks' eval forward on CUDA: as shipped (this package's networks replay CUDA graphs,
# nnU-Net's runs eagerly), every network replayed (nnU-Net's wrapped in the same replay), or every network eager
CUDA_GRAPH_MODES = ("default", "all", "off")


def add_cuda_graphs_argument(parser) -> None:
    """The ``--cuda-graphs`` option of ``speed_report`` and ``nnunetv2_lgms profile``."""
    parser.add_argument("--cuda-graphs", default="default", choices=CUDA_GRAPH_MODES,
                        help="CUDA only: replay of the eval forward from CUDA graphs as shipped (default: this "
                             "package's networks, not nnU-Net's), for every network (all), or for none (off)")


class BenchmarkError(RuntimeError):
    """A user-facing error: the commands print the message and exit non-zero."""


def ensure_ext_trainer() -> None:
    """Put our trainer shim on ``nnUNet_extTrainer`` in this process (nnU-Net reads the variable lazily)."""
    if not shim_on_path(os.environ.get(ENV_VAR)):
        os.environ[ENV_VAR] = ext_trainer_value(os.environ.get(ENV_VAR))


def require_env(var: str) -> Path:
    """One of nnU-Net's folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``), read through
    ``nnunetv2.paths`` as nnU-Net reads it."""
    from nnunetv2 import paths

    value = getattr(paths, var).get()
    if not value:
        raise BenchmarkError(f"{var} is not set; export it as for the nnUNetv2_* commands")
    return Path(value)


def dataset_name(dataset_name_or_id) -> str:
    """``503`` -> ``Dataset503_KvasirSEG`` (nnU-Net's lookup over nnUNet_raw/preprocessed/results)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(str(dataset_name_or_id))
    except RuntimeError as e:
        raise BenchmarkError(str(e)) from None


def find_trainer_class(name: str):
    """nnU-Net's own lookup (stock trainers, then ``nnUNet_extTrainer``), with its search chatter suppressed."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    ensure_ext_trainer()
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            return recursive_find_trainer_class_by_name(name)
    except RuntimeError as e:
        raise BenchmarkError(f"trainer {name!r} not found: {e}") from None


@dataclass
class PlanContext:
    """One configuration of one plans file, with what ``nnUNetTrainer.initialize`` derives from it."""
    dataset_name: str
    plans_identifier: str
    configuration: str
    plans_manager: object
    configuration_manager: object
    dataset_json: dict
    folder: Path  # $nnUNet_preprocessed/DatasetXXX

    @property
    def label_manager(self):
        return self.plans_manager.get_label_manager(self.dataset_json)

    @property
    def num_input_channels(self) -> int:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        return determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)

    @property
    def num_output_channels(self) -> int:
        return self.label_manager.num_segmentation_heads

    @property
    def patch_size(self):
        return tuple(int(s) for s in self.configuration_manager.patch_size)

    @property
    def batch_size(self) -> int:
        return int(self.configuration_manager.batch_size)

    @property
    def data_folder(self) -> Path:
        return self.folder / self.configuration_manager.data_identifier


def load_plan_context(dataset_name_or_id, configuration: str, plans_identifier: str = "nnUNetPlans") -> PlanContext:
    """Read ``$nnUNet_preprocessed/DatasetXXX/{plans_identifier}.json`` and its ``dataset.json``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = dataset_name(dataset_name_or_id)
    folder = require_env("nnUNet_preprocessed") / name
    plans_file = folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise BenchmarkError(f"{plans_file} not found; run nnUNetv2_plan_and_preprocess -d {dataset_name_or_id} first"
                             f" (or pass the right -p)")
    plans = PlansManager(json.loads(plans_file.read_text()))
    if configuration not in plans.available_configurations:
        raise BenchmarkError(f"configuration {configuration!r} not in {plans_file} "
                             f"(available: {', '.join(plans.available_configurations)})")
    dataset_json = json.loads((folder / "dataset.json").read_text())
    return PlanContext(name, plans_identifier, configuration, plans, plans.get_configuration(configuration),
                       dataset_json, folder)


def build_network(trainer_class, ctx: PlanContext, deep_supervision: bool = True):
    """``trainer_class.build_network_architecture`` with the arguments ``nnUNetTrainer.initialize`` passes."""
    return trainer_class.build_network_architecture(ctx.plans_manager, ctx.configuration_manager,
                                                    ctx.num_input_channels, ctx.num_output_channels,
                                                    deep_supervision)


def results_folder(dataset: str, trainer: str, plans_identifier: str, configuration: str,
                   results_root: Optional[Path] = None) -> Path:
    root = results_root if results_root is not None else require_env("nnUNet_results")
    return Path(root) / dataset / f"{trainer}__{plans_identifier}__{configuration}"
