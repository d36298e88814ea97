# nnU-Net imports every module under the folder named by nnUNet_extTrainer (this file's grandparent) by a name
# relative to that folder. This file must stay a pure re-export with absolute imports: the classes then are the
# canonical objects of nnunetv2_lgms.trainers, whatever name nnU-Net imports this module under.
from nnunetv2_lgms.trainers import *  # noqa: F401,F403
