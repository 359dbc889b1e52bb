"""Checkpoints: a resumed run ends bit-for-bit where an uninterrupted one does (CPU), even after
SIGKILL mid-epoch; unusable checkpoints are refused and left untouched."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train.cifar10 as cifar10
from train.checkpoint import CHECKPOINT_NAME, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def tiny_args(out: Path, *extra: str) -> list[str]:
    # NCHW: the tiny model's 4- and 8-channel convolutions run about a third slower in channels_last
    # (the default, for real widths); test_train_loop checks that layout on its own.
    return ["--dataset", "synthetic", "--model", "tiny", "--synthetic-size", "640", "--batch-size", "64",
            "--epochs", "3", "--warmup-epochs", "1", "--device", "cpu", "--out", str(out),
            "--no-channels-last", *extra]


def assert_same_trajectory(run_a: Path, run_b: Path) -> None:
    a, b = load_checkpoint(run_a / CHECKPOINT_NAME), load_checkpoint(run_b / CHECKPOINT_NAME)
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    for key in ("params", "buffers"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} {name} differs"
    # Optimizer state: every tensor (momentum buffers, step counts, loss scale) and the current lr.
    # (Non-tensor metadata may differ harmlessly: torch adds 'differentiable' to loaded param groups.)
    tensors_a = [x for x in torch.utils._pytree.tree_leaves(a["optimizer"]) if isinstance(x, torch.Tensor)]
    tensors_b = [x for x in torch.utils._pytree.tree_leaves(b["optimizer"]) if isinstance(x, torch.Tensor)]
    assert len(tensors_a) == len(tensors_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(tensors_a, tensors_b))
    if "sam_sgd" in a["optimizer"]:
        assert a["optimizer"]["sam_sgd"]["param_groups"][0]["lr"] == b["optimizer"]["sam_sgd"]["param_groups"][0]["lr"]
    timing = {"seconds", "train_seconds", "train_cpu_seconds", "images_per_s"}
    rows_a = [json.loads(line) for line in (run_a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (run_b / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows_a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in rows_b]


@pytest.mark.parametrize("api, base, mode", [("functional", "sgd", "full"), ("adapter", "sgd", "full"),
                                            ("adapter", "adamw", "full"), ("functional", "adamw", "looksam"),
                                            ("adapter", "sgd", "looksam"), ("adapter", "sgd", "adaptive"),
                                            ("adapter", "sgd", "rst"), ("functional", "sgd", "ksam")])
def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, monkeypatch, api, base, mode):
    run = ("--api", api, "--base", base, "--sam-mode", mode, "--sam-every", "3")
    assert cifar10.main(tiny_args(tmp_path / "straight", *run)) == 0

    real_evaluate, calls = cifar10.evaluate, []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2 trained, its checkpoint not yet written
            raise RuntimeError("simulated crash")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(cifar10, "evaluate", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cifar10.main(tiny_args(tmp_path / "resumed", *run))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT_NAME)["epoch"] == 1
    assert cifar10.main(tiny_args(tmp_path / "resumed", *run, "--resume")) == 0
    assert_same_trajectory(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path):
    # Long enough epochs (80 steps) that the kill lands inside one, not between runs.
    args = ["--synthetic-size", "2560", "--batch-size", "32"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "train.cifar10", *tiny_args(killed, *args)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:  # epoch 1 checkpointed
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "summary.json").exists()
    assert load_checkpoint(killed / CHECKPOINT_NAME)["epoch"] < 3

    assert cifar10.main(tiny_args(killed, *args, "--resume")) == 0
    assert cifar10.main(tiny_args(tmp_path / "straight", *args)) == 0
    assert_same_trajectory(tmp_path / "straight", killed)
    assert not [p for p in killed.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_corrupt_checkpoint_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    garbage = b"PK\x03\x04 this is not a checkpoint" * 10
    (out / CHECKPOINT_NAME).write_bytes(garbage)
    assert cifar10.main(tiny_args(out, "--resume")) == 2
    assert "corrupt" in capsys.readouterr().err
    assert (out / CHECKPOINT_NAME).read_bytes() == garbage


def test_truncated_checkpoint_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert cifar10.main(tiny_args(out, "--epochs", "1", "--warmup-epochs", "0")) == 0
    half = (out / CHECKPOINT_NAME).read_bytes()[:2000]
    (out / CHECKPOINT_NAME).write_bytes(half)
    assert cifar10.main(tiny_args(out, "--epochs", "1", "--warmup-epochs", "0", "--resume")) == 2
    assert "corrupt" in capsys.readouterr().err
    assert (out / CHECKPOINT_NAME).read_bytes() == half


@pytest.mark.parametrize("change", [["--lr", "0.05"], ["--model", "resnet20"], ["--optim", "sgd"], ["--base", "adamw"]])
def test_checkpoint_of_another_configuration_is_refused(tmp_path, capsys, change):
    out = tmp_path / "run"
    assert cifar10.main(tiny_args(out, "--epochs", "1", "--warmup-epochs", "0")) == 0
    before = (out / CHECKPOINT_NAME).read_bytes()
    capsys.readouterr()
    assert cifar10.main(tiny_args(out, "--epochs", "1", "--warmup-epochs", "0", *change, "--resume")) == 2
    err = capsys.readouterr().err
    assert "different run" in err and change[0] in err and "Traceback" not in err
    assert (out / CHECKPOINT_NAME).read_bytes() == before


def test_existing_checkpoint_needs_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert cifar10.main(tiny_args(out, "--epochs", "1", "--warmup-epochs", "0")) == 0
    before = (out / CHECKPOINT_NAME).read_bytes()
    assert cifar10.main(tiny_args(out, "--epochs", "1", "--warmup-epochs", "0")) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / CHECKPOINT_NAME).read_bytes() == before


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_learning_rate = cifar10.learning_rate

    def explode_in_epoch_two(step, total_steps, warmup_steps, peak):
        return 1e30 if step >= total_steps // 3 else real_learning_rate(step, total_steps, warmup_steps, peak)

    monkeypatch.setattr(cifar10, "learning_rate", explode_in_epoch_two)
    out = tmp_path / "run"
    assert cifar10.main(tiny_args(out)) == 3
    err = capsys.readouterr().err
    assert "diverged in epoch 2" in err and "Traceback" not in err
    saved = load_checkpoint(out / CHECKPOINT_NAME)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in saved["params"].values())
    assert not (out / "summary.json").exists()
