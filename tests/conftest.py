"""Fixtures shared by the test modules."""
import pytest


@pytest.fixture
def trainer_env(tmp_path, monkeypatch):
    """Empty nnUNet_raw/preprocessed/results folders for a trainer built in the test (its __init__ reads them)."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))


# One planned synthetic dataset per dimension for the end-to-end tests of both trainers (each trains into its own
# results folder): nnU-Net's fingerprint extraction alone takes ~25 s even for 8 tiny cases on 2 cores.
@pytest.fixture(scope="session")
def e2e_project_2d(tmp_path_factory):
    from e2e_utils import NnunetProject
    return NnunetProject(tmp_path_factory.mktemp("nnunet2d"), 990, 2, "2d", (48, 48))


@pytest.fixture(scope="session")
def e2e_project_3d(tmp_path_factory):
    from e2e_utils import NnunetProject
    return NnunetProject(tmp_path_factory.mktemp("nnunet3d"), 991, 3, "3d_fullres", (16, 32, 32))


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, the previous count restored after it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
