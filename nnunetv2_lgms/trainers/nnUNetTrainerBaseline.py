"""Stock ``nnUNetTrainer`` (nnU-Net's own network and recipe) on the plugin's short budgets, so that smoke runs, the
demo and the CPU benchmarks compare LGMSNet/GLIMS with vanilla nnU-Net trained for exactly as long."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_lgms.trainers.budget import (CPUBenchmarkBudget, CPUBenchmarkBudget3D, CPUEqualTimeBudget, DemoBudget,
                                           SmokeBudget)


class nnUNetTrainerBaseline_smoke(SmokeBudget, nnUNetTrainer):
    pass


class nnUNetTrainerBaseline_demo(DemoBudget, nnUNetTrainer):
    pass


class nnUNetTrainerBaseline_cpubench(CPUBenchmarkBudget, nnUNetTrainer):
    pass


class nnUNetTrainerBaseline_cpubench3d(CPUBenchmarkBudget3D, nnUNetTrainer):
    pass


class nnUNetTrainerBaseline_cpu45min(CPUEqualTimeBudget, nnUNetTrainer):
    pass
