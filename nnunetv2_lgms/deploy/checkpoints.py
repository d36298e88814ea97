"""Fold checkpoints of *untrained* networks, written by the trainer itself, for timing and pipeline checks.

Inference speed and export correctness do not depend on what the weights learnt, so a benchmark or a test can skip
training: :func:`write_untrained_fold` instantiates the trainer as ``nnUNetv2_train`` does, builds its network and
optimiser, and calls the trainer's own ``save_checkpoint``. The result is a results folder that ``nnUNetv2_predict``
and ``nnunetv2_lgms export`` accept like a trained one (``plans.json``, ``dataset.json``,
``dataset_fingerprint.json`` beside ``fold_X/checkpoint_final.pth``). Only the dataset's plans are needed
(``nnUNetv2_plan_and_preprocess --no_pp`` is enough), no preprocessed data.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Union

import torch


def write_untrained_fold(dataset, configuration: str, trainer: str, fold: Union[int, str] = 0,
                         plans_identifier: str = "nnUNetPlans", checkpoint_name: str = "checkpoint_final.pth",
                         seed: int = 0) -> Path:
    """Write ``$nnUNet_results/DatasetX/TRAINER__PLANS__CONFIG/fold_F/checkpoint_name`` from a freshly initialised
    network (seeded) and return the fold folder."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    from nnunetv2_lgms.benchmark.models import find_trainer_class, load_plan_context

    ctx = load_plan_context(dataset, configuration, plans_identifier)
    trainer_class = find_trainer_class(trainer)
    plans = copy.deepcopy(ctx.plans_manager.plans)
    plans["continue_training"] = False  # nnUNetTrainer.__init__ pops it (run_training adds it)
    fold = fold if str(fold) == "all" else int(fold)
    t = trainer_class(plans, configuration, fold, copy.deepcopy(ctx.dataset_json), device=torch.device("cpu"))

    # the parts of nnUNetTrainer.initialize / on_train_start that save_checkpoint and the predictor read, without
    # the data loaders (which would need preprocessed data)
    torch.manual_seed(seed)
    t.num_input_channels = determine_num_input_channels(t.plans_manager, t.configuration_manager, t.dataset_json)
    t.network = t.build_network_architecture(t.plans_manager, t.configuration_manager, t.num_input_channels,
                                             t.label_manager.num_segmentation_heads, t.enable_deep_supervision)
    t.optimizer, t.lr_scheduler = t.configure_optimizers()
    t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets inference_allowed_mirroring_axes

    out = Path(t.output_folder)
    out.mkdir(parents=True, exist_ok=True)
    t.save_checkpoint(str(out / checkpoint_name))
    base = Path(t.output_folder_base)
    save_json(t.plans_manager.plans, str(base / "plans.json"), sort_keys=False)
    save_json(t.dataset_json, str(base / "dataset.json"), sort_keys=False)
    fingerprint = ctx.folder / "dataset_fingerprint.json"
    if fingerprint.is_file():
        shutil.copyfile(fingerprint, base / "dataset_fingerprint.json")
    (out / "untrained.json").write_text(json.dumps({"seed": seed, "note": "weights of an untrained network, written "
                                                    "by nnunetv2_lgms.deploy.checkpoints for timing"}))
    return out
