"""bench/gpu_check.py's CPU-safe parts, and the trainer's --compile-mode that its CUDA-graph stages use."""

import json

import pytest
import torch

import train.cifar10 as cifar10
from bench import gpu_check
from train.checkpoint import CHECKPOINT_NAME, load_checkpoint

STAGES = ["cuda_tests", "report_fp32", *(name for name, *_ in gpu_check.TRAIN_RUNS), "report_bf16"]


def test_dry_run_writes_the_plan_and_the_environment(tmp_path):
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 0
    record = json.loads((tmp_path / gpu_check.RESULTS_NAME).read_text())
    assert list(record["stages"]) == STAGES
    assert all(stage["status"] == "dry run" for stage in record["stages"].values())
    assert "--compile-mode reduce-overhead" in record["stages"]["train_wrn28_10_bf16_cudagraphs"]["command"]
    assert "--amp bf16" in record["stages"]["report_bf16"]["command"]
    assert {"date", "torch", "torch_cuda", "nvidia_smi", "load_average"} <= record["environment"].keys()


@pytest.mark.parametrize("name, model, amp, mode", gpu_check.TRAIN_RUNS)
def test_the_cache_warming_runs_are_valid_trainer_runs_of_their_stage(tmp_path, name, model, amp, mode):
    argv = gpu_check.warm_argv(tmp_path, "cpu", model, amp, mode)
    assert argv[1:3] == ["-m", "train.cifar10"]
    args = cifar10.parse_args(argv[3:])
    assert (args.model, args.amp, args.compile_mode, args.compile, args.limit_steps) == (model, amp, mode, True, 1)


def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main([str(tmp_path / "out"), "--only", "report_fp64"])
    assert "report_fp32" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_tiny_stage_runs_and_its_figures_land_in_the_results_file(tmp_path):
    assert gpu_check.main([str(tmp_path), "--device", "cpu", "--tiny", "--only", "train_resnet20_bf16"]) == 0
    stages = json.loads((tmp_path / gpu_check.RESULTS_NAME).read_text())["stages"]
    assert list(stages) == ["train_resnet20_bf16"]
    stage = stages["train_resnet20_bf16"]
    assert stage["status"] == "ok" and stage["returncode"] == 0
    run, = stage["results"]["runs"]["sam-functional-eager"]
    assert stage["results"]["amp"] == "bf16" and run["images_per_s"] > 0


def test_compile_mode_needs_compile(capsys):
    with pytest.raises(SystemExit):
        cifar10.parse_args(["--compile-mode", "reduce-overhead"])
    assert "--compile-mode reduce-overhead needs --compile" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_mode_reaches_torch_compile_and_the_run_takes_the_eager_steps(tmp_path, monkeypatch):
    """On a CPU reduce-overhead compiles as the default mode (no CUDA graphs): the steps are the eager ones."""
    common = ["--dataset", "synthetic", "--model", "tiny", "--synthetic-size", "128", "--batch-size", "64",
              "--epochs", "1", "--warmup-epochs", "0", "--device", "cpu", "--no-channels-last", "--limit-steps", "2"]
    assert cifar10.main(common + ["--out", str(tmp_path / "eager")]) == 0
    modes, compile_ = [], torch.compile

    def recording_compile(fn, **kwargs):
        modes.append(kwargs.get("mode"))
        return compile_(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    out = tmp_path / "compiled"
    assert cifar10.main(common + ["--compile", "--compile-mode", "reduce-overhead", "--out", str(out)]) == 0
    assert modes == ["reduce-overhead", None]  # the training step, then the eval step in the default mode
    compiled = load_checkpoint(out / CHECKPOINT_NAME)["params"]
    eager = load_checkpoint(tmp_path / "eager" / CHECKPOINT_NAME)["params"]
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5)
