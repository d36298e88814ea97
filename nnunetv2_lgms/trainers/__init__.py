"""All trainers of the plugin. The ``nnUNet_extTrainer`` shim re-exports exactly ``__all__``."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as _nnUNetTrainer

from nnunetv2_lgms.trainers import nnUNetTrainerBaseline as _baseline
from nnunetv2_lgms.trainers import nnUNetTrainerGLIMS as _glims
from nnunetv2_lgms.trainers import nnUNetTrainerLGMSNet as _lgmsnet
from nnunetv2_lgms.trainers import nnUNetTrainerLGMSNet_recompute as _lgmsnet_recompute


def _trainers_of(*modules):
    return {name: obj for m in modules for name, obj in vars(m).items()
            if isinstance(obj, type) and issubclass(obj, _nnUNetTrainer) and obj.__module__ == m.__name__}


_TRAINERS = _trainers_of(_lgmsnet, _lgmsnet_recompute, _glims, _baseline)
globals().update(_TRAINERS)
__all__ = sorted(_TRAINERS)
