"""Fixtures shared by the test modules."""
import pytest


@pytest.fixture
def trainer_env(tmp_path, monkeypatch):
    """Empty nnUNet_raw/preprocessed/results folders for a trainer built in the test (its __init__ reads them)."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
