"""Hand-written nnU-Net plans for network contract tests (the shapes nnU-Net's planner produces; see
../shared/specs/architectures.md §6.1)."""
from __future__ import annotations

import copy

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

# name: (patch size, strides = pool_op_kernel_sizes, conv kernel sizes)
PLANS = {
    "2d_256": ((256, 256), [[1, 1]] + [[2, 2]] * 6, [[3, 3]] * 7),
    "2d_512x448": ((512, 448), [[1, 1]] + [[2, 2]] * 6, [[3, 3]] * 7),
    "2d_48_3pools": ((48, 48), [[1, 1]] + [[2, 2]] * 3, [[3, 3]] * 4),
    "3d_128": ((128, 128, 128), [[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6),
    "3d_96": ((96, 96, 96), [[1, 1, 1]] + [[2, 2, 2]] * 4, [[3, 3, 3]] * 5),
    "3d_40x56x40_hippocampus": ((40, 56, 40), [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4),
    "3d_40x224x192_aniso": ((40, 224, 192),
                            [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                            [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
}


def configuration_dict(patch, strides, kernels, batch_size=2) -> dict:
    dim = len(patch)
    return {
        "data_identifier": f"nnUNetPlans_{dim}d", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size, "patch_size": list(patch), "median_image_size_in_voxels": list(patch),
        "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": len(strides), "features_per_stage": [32 * 2 ** i for i in range(len(strides))],
                            "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": kernels,
                            "strides": strides, "n_conv_per_stage": [2] * len(strides),
                            "n_conv_per_stage_decoder": [2] * (len(strides) - 1), "conv_bias": True,
                            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": True,
    }


def plans_dict(name: str, configuration: str = "cfg", batch_size: int = 2) -> dict:
    patch, strides, kernels = PLANS[name]
    return {
        "dataset_name": "Dataset999_Test", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0] * len(patch),
        "original_median_shape_after_transp": list(patch), "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(range(len(patch))), "transpose_backward": list(range(len(patch))),
        "configurations": {configuration: configuration_dict(patch, strides, kernels, batch_size)},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0,
                                                              "percentile_00_5": -1.0, "percentile_99_5": 1.0,
                                                              "std": 1.0}},
    }


def managers(name: str, configuration: str = "cfg", batch_size: int = 2):
    plans = PlansManager(copy.deepcopy(plans_dict(name, configuration, batch_size)))
    return plans, plans.get_configuration(configuration)


def configuration_manager(name: str) -> ConfigurationManager:
    return managers(name)[1]


def trainer_plans(patch, strides, kernels, batch_size: int = 2) -> dict:
    """Plans with one configuration 'cfg' of the given shape, as ``nnUNetv2_train`` hands them to a trainer."""
    plans = plans_dict("2d_48_3pools")
    plans["configurations"] = {"cfg": configuration_dict(patch, strides, kernels, batch_size)}
    plans["continue_training"] = False  # get_trainer_from_args adds it; nnUNetTrainer.__init__ pops it
    return plans


def make_trainer(cls, dataset_json: dict, plan: str = "2d_256", batch_size: int = 2):
    """``cls`` built as ``nnUNetv2_train`` builds it (CPU), on the hand-written plan ``plan`` as configuration 'cfg'."""
    import torch

    plans = plans_dict(plan, batch_size=batch_size)
    plans["continue_training"] = False  # get_trainer_from_args adds it; nnUNetTrainer.__init__ pops it
    return cls(plans, "cfg", 0, copy.deepcopy(dataset_json), torch.device("cpu"))
