"""Speed report: nnU-Net's planner on a hand-written fingerprint gives nnU-Net's real plan, and one command writes
the report (tables, JSON, figure) with ratios against the first trainer."""
import json
import math

import pytest

from nnunetv2_lgms.benchmark import speed_report, synthetic_plans
from nnunetv2_lgms.benchmark.synthetic_plans import PlanPreset


@pytest.fixture
def clean_nnunet_env(monkeypatch, tmp_path):
    # plan_preset points this process's nnUNet_* variables at its own folders; setenv first so that monkeypatch
    # restores the user's values afterwards
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / "unused"))


def test_hippocampus_preset_reproduces_nnunets_plan_for_the_real_dataset(tmp_path, clean_nnunet_env):
    # nnUNetv2_plan_and_preprocess on the real MSD Task04 (../shared/data) plans exactly this
    ctx = synthetic_plans.plan_preset("hippocampus-3d", tmp_path)
    assert ctx.patch_size == (40, 56, 40) and ctx.batch_size == 9
    assert ctx.configuration_manager.pool_op_kernel_sizes == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert (ctx.num_input_channels, ctx.num_output_channels) == (1, 3)


def test_2d_256_preset_is_the_batch_12_plan(tmp_path, clean_nnunet_env):
    ctx = synthetic_plans.plan_preset("2d-256", tmp_path)
    assert ctx.patch_size == (256, 256) and ctx.batch_size == 12 and ctx.num_input_channels == 3


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(synthetic_plans.BenchmarkError, match="unknown plan preset 'nope'.*2d-256"):
        synthetic_plans.plan_preset("nope", tmp_path)


def test_speed_report_writes_tables_json_and_figure(tmp_path, clean_nnunet_env, monkeypatch, capsys):
    tiny = PlanPreset("tiny 2D", 979, "2d", {"0": "x"}, {"background": 0, "a": 1}, (999.0, 1.0, 1.0), (1, 32, 32),
                      40, ".png")
    monkeypatch.setitem(synthetic_plans.PRESETS, "tiny", tiny)
    out = tmp_path / "report"
    rc = speed_report.main(["--out", str(out), "--presets", "tiny", "-tr", "nnUNetTrainer", "nnUNetTrainerLGMSNet",
                            "--repeats", "1", "--warmup", "0"])
    assert rc == 0
    sections = json.loads((out / "speed_report.json").read_text())
    assert [s["preset"] for s in sections] == ["tiny"]
    rows = sections[0]["rows"]
    assert [r["trainer"] for r in rows] == ["nnUNetTrainer", "nnUNetTrainerLGMSNet"]
    for r in rows:
        assert r["patch_size"] == [32, 32] and r["gflops"] > 0 and r["inference_s"] > 0 and r["train_step_s"] > 0
    (entry,) = speed_report.time_vs_flops(rows)
    assert math.isclose(entry["flop_ratio"], rows[1]["gflops"] / rows[0]["gflops"])
    assert math.isclose(entry["train_step_time_ratio"], rows[1]["train_step_s"] / rows[0]["train_step_s"])
    md = (out / "speed_report.md").read_text()
    assert "| tiny | nnUNetTrainerLGMSNet | " + f"{entry['flop_ratio']:.2f} |" in md
    assert (out / "speed_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_ratios_come_with_their_per_repetition_range():
    ref = {"trainer": "nnUNetTrainer", "gflops": 30.0, "train_step_s": 10.0, "inference_s": 3.0,
           "samples": {"train_step_s": [10.0, 12.0, 9.0], "inference_s": [3.0, 3.0]}}
    net = {"trainer": "nnUNetTrainerLGMSNet", "gflops": 10.0, "train_step_s": 5.0, "inference_s": 4.5,
           "samples": {"train_step_s": [5.0, 5.0, 4.0], "inference_s": [4.5, 4.2, 4.8]}}
    (entry,) = speed_report.time_vs_flops([ref, net])
    assert entry["train_step_time_ratio"] == 0.5
    low, high = entry["train_step_time_ratio_range"]
    assert math.isclose(low, 5 / 12) and math.isclose(high, 0.5)
    assert "inference_time_ratio_range" not in entry  # 3 samples against 2: no pairs
    assert speed_report._fmt_ratio(0.5, (low, high)) == "0.50 (2.00x faster; 2.00–2.40x per repetition)"
    assert speed_report._fmt_ratio(1.5, (1.4, 1.7)) == "1.50 (1.50x slower; 1.40–1.70x per repetition)"
    assert speed_report._fmt_ratio(0.5, (0.5, 0.5)) == "0.50 (2.00x faster)"  # one repetition: no spread
    assert speed_report._fmt_ratio(None) == "–"


def test_speed_report_keeps_the_plans_finished_before_a_failure(tmp_path, clean_nnunet_env, monkeypatch):
    # a run stopped part-way (an error, or a time limit on a lent GPU) leaves a complete report of the finished plans
    tiny = PlanPreset("tiny 2D", 977, "2d", {"0": "x"}, {"background": 0, "a": 1}, (999.0, 1.0, 1.0), (1, 32, 32),
                      40, ".png")
    monkeypatch.setitem(synthetic_plans.PRESETS, "tiny", tiny)
    monkeypatch.setitem(synthetic_plans.PRESETS, "broken", tiny)
    real_plan_preset = synthetic_plans.plan_preset

    def plan_preset(key, root):
        if key == "broken":
            raise synthetic_plans.BenchmarkError("planning failed")
        return real_plan_preset(key, root)

    monkeypatch.setattr(synthetic_plans, "plan_preset", plan_preset)
    out = tmp_path / "report"
    rc = speed_report.main(["--out", str(out), "--presets", "tiny", "broken", "-tr", "nnUNetTrainer",
                            "nnUNetTrainerLGMSNet", "--repeats", "1", "--warmup", "0", "--batch-1-only"])
    assert rc == 1
    assert [s["preset"] for s in json.loads((out / "speed_report.json").read_text())] == ["tiny"]
    assert "## tiny" in (out / "speed_report.md").read_text() and (out / "speed_report.png").is_file()


def test_cuda_graph_modes_of_the_profiled_networks(tmp_path, clean_nnunet_env, monkeypatch):
    """``--cuda-graphs all`` wraps nnU-Net's network in the same graph replay as ours (same weights, same
    outputs), ``off`` switches ours off, a wrong mode is a clear error."""
    import torch
    from nnunetv2_lgms.benchmark.models import ensure_ext_trainer
    from nnunetv2_lgms.benchmark.profiling import ProfileSettings, _Subject
    from nnunetv2_lgms.acceleration.cuda_graphs import GraphedModule

    tiny = PlanPreset("tiny 2D", 979, "2d", {"0": "x"}, {"background": 0, "a": 1}, (999.0, 1.0, 1.0), (1, 32, 32),
                      40, ".png")
    monkeypatch.setitem(synthetic_plans.PRESETS, "tiny", tiny)
    ensure_ext_trainer()
    ctx = synthetic_plans.plan_preset("tiny", tmp_path)
    cpu = torch.device("cpu")
    shipped, wrapped = (_Subject("nnUNetTrainer", ctx, cpu, cuda_graphs=m) for m in ("default", "all"))
    assert isinstance(wrapped.eval_net, GraphedModule) and not isinstance(shipped.eval_net, GraphedModule)
    x = torch.randn(1, ctx.num_input_channels, *ctx.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval_net(x), shipped.eval_net(x), rtol=0, atol=0)
    assert _Subject("nnUNetTrainerLGMSNet", ctx, cpu, cuda_graphs="off").eval_net.cuda_graph_inference is False
    assert _Subject("nnUNetTrainerLGMSNet", ctx, cpu).eval_net.cuda_graph_inference is True
    with pytest.raises(synthetic_plans.BenchmarkError, match="cuda_graphs must be one of default, all, off"):
        ProfileSettings(cuda_graphs="on")


def test_cpu_description_names_the_model_and_the_vector_isa(tmp_path, monkeypatch):
    import torch
    from nnunetv2_lgms.benchmark.profiling import cpu_description, environment
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_description(str(cpuinfo)) == "AMD EPYC 7B13, AVX2"
    # no /proc/cpuinfo (macOS, Windows): the platform's name, still with the ISA
    assert cpu_description(str(tmp_path / "missing")).endswith(", AVX2")
    assert environment(torch.device("cpu"))["device_name"].endswith(", AVX2")
