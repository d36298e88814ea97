"""The console script's subcommands that need no training: paper-check and the demo's safety rules."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nnunetv2_lgms.cli import SUBCOMMANDS, main

BIN = Path(sys.executable).parent


def test_paper_check_json_reports_exact_lgmsnet_counts_and_flops():
    out = subprocess.run([BIN / "nnunetv2_lgms", "paper-check", "--json", "--model", "LGMSNet"],
                         capture_output=True, text=True, check=True).stdout
    rows = {r["model"]: r for r in json.loads(out)}
    assert set(rows) == {"LGMSNet-2D", "LGMSNet-3D"}
    for row in rows.values():
        assert {"model", "config", "params", "reference_params", "gflops"} <= set(row)
        assert row["params"] == row["reference_params"]
    assert rows["LGMSNet-2D"]["params"] == 2_321_393
    assert rows["LGMSNet-2D"]["gflops"] == pytest.approx(10.01, abs=0.01)
    assert rows["LGMSNet-2D"]["gmacs"] == pytest.approx(5.01, abs=0.01)
    assert rows["LGMSNet-3D"]["params"] == 6_193_742
    assert rows["LGMSNet-3D"]["gflops"] == pytest.approx(137.27, abs=0.05)
    assert "9.86M" in rows["LGMSNet-3D"]["paper"]


def test_paper_check_table_and_unknown_model(capsys):
    assert main(["paper-check", "--no-flops", "--model", "LGMSNet-2D"]) == 0
    assert "| LGMSNet-2D | 3 in, 1 out, 256x256, no DS | 2,321,393 | 2,321,393 | yes |" in capsys.readouterr().out
    assert main(["paper-check", "--model", "NoSuchNet"]) == 2


def test_every_subcommand_module_has_the_cli_interface():
    import importlib
    for name, (module, _) in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run), name


def test_demo_refuses_a_folder_it_did_not_create(tmp_path):
    (tmp_path / "precious.txt").write_text("user data")
    with pytest.raises(SystemExit, match="not a demo folder"):
        main(["demo", "--work-dir", str(tmp_path), "--overwrite"])
    assert (tmp_path / "precious.txt").read_text() == "user data"


@pytest.mark.slow
def test_demo_smoke_runs_the_whole_pipeline(tmp_path):
    work = tmp_path / "demo"
    result = subprocess.run([BIN / "nnunetv2_lgms", "demo", "--smoke", "--work-dir", work],
                            capture_output=True, text=True, env={**__import__("os").environ, "nnUNet_def_n_proc": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((work / "demo_results.json").read_text())
    assert [r["trainer"] for r in rows] == ["nnUNetTrainerLGMSNet_smoke", "nnUNetTrainerBaseline_smoke"]
    assert rows[0]["params"] == LGMSNET_2D_DS_PARAMS
    assert all(0.0 <= r["dice_test"] <= 1.0 and r["train_s"] > 0 and r["predict_s"] > 0 for r in rows)
    assert "| nnUNetTrainerLGMSNet_smoke | 2.32M |" in (work / "demo_results.md").read_text()
    assert len(list((work / "predictions" / rows[0]["trainer"]).glob("*.png"))) == 2
    # a second run without --overwrite refuses instead of mixing results
    again = subprocess.run([BIN / "nnunetv2_lgms", "demo", "--smoke", "--work-dir", work], capture_output=True, text=True)
    assert again.returncode != 0 and "--overwrite" in again.stderr


# 3 RGB channels and 2 outputs (background, lesion): the paper's 2,321,393 (1 output) + 17 for the second main-head
# channel + the deep-supervision heads 32->2, 64->2, 128->2 (66 + 130 + 258)
LGMSNET_2D_DS_PARAMS = 2_321_393 + 17 + 66 + 130 + 258
