"""Every mistake a user can make with the trainer gets a message and an exit code, never a traceback:
bad values (refused before anything is created), unusable folders, damaged checkpoints, signals,
two trainers on one run folder, resuming a finished run; and what a user expects besides (the
warm-up of a short run, the closing line, defaults in --help, TensorBoard)."""

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train.cifar10 as cifar10
from train import checkpoint, config
from train.checkpoint import CHECKPOINT_NAME, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def tiny_args(out: Path, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--model", "tiny", "--synthetic-size", "320", "--batch-size", "64",
            "--epochs", "1", "--warmup-epochs", "0", "--limit-steps", "1", "--device", "cpu", "--out", str(out), *extra]


def exit_code(argv: list[str]) -> int:
    """main's return value, or the code of the SystemExit that argparse raised."""
    try:
        return cifar10.main(argv)
    except SystemExit as done:
        return done.code


def assert_refused(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "error" in err
    for name in names:
        assert name in err, (name, err)


# --- bad values: refused before anything is created -------------------------------------------


@pytest.mark.parametrize("api", ["functional", "adapter"])
@pytest.mark.parametrize("flag, value", [("--rho", "-1"), ("--rho", "nan"), ("--momentum", "-0.5"),
                                         ("--weight-decay", "-1"), ("--label-smoothing", "1.5"), ("--lr", "inf")])
def test_bad_hyperparameters_exit_2_before_the_run_folder_exists(tmp_path, capsys, api, flag, value):
    out = tmp_path / "run"
    code = exit_code(tiny_args(out, "--api", api, flag, value))
    assert_refused(code, capsys.readouterr().err, flag)
    assert not out.exists()


def test_momentum_above_one_runs_with_a_warning(tmp_path, capsys):
    assert cifar10.main(tiny_args(tmp_path / "run", "--momentum", "1.5")) == 0
    assert "warning: --momentum 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--data-dir"])
def test_a_regular_file_where_a_folder_belongs_exits_2(tmp_path, capsys, flag):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    if flag == "--out":
        argv = tiny_args(a_file / "below")
    else:
        argv = tiny_args(tmp_path / "run", "--dataset", "cifar10", "--data-dir", str(a_file))
    assert_refused(exit_code(argv), capsys.readouterr().err, flag, "is a file")
    assert not (tmp_path / "run").exists()


def refuse_mkdir_under(monkeypatch, folder: Path, err: int) -> None:
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(folder)):
            raise OSError(err, os.strerror(err), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


def test_read_only_data_dir_exits_2(tmp_path, capsys, monkeypatch):
    refuse_mkdir_under(monkeypatch, tmp_path / "data", errno.EROFS)
    code = cifar10.main(tiny_args(tmp_path / "run", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data")))
    assert_refused(code, capsys.readouterr().err, "--data-dir", "Read-only file system")
    assert not (tmp_path / "run").exists()


def test_read_only_out_exits_2(tmp_path, capsys, monkeypatch):
    refuse_mkdir_under(monkeypatch, tmp_path / "run", errno.EROFS)
    assert_refused(cifar10.main(tiny_args(tmp_path / "run")), capsys.readouterr().err, "cannot write",
                   "Read-only file system")


def test_full_disk_exits_2_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    real_write_text = pathlib.Path.write_text

    def disk_fills_up(self, text, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real_write_text(self, text[:10], *args, **kwargs)  # a partial file, as a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", disk_fills_up)
    out = tmp_path / "run"
    assert_refused(cifar10.main(tiny_args(out)), capsys.readouterr().err, "No space left", "free some space")
    assert not out.exists() or not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_full_disk_while_checkpointing_exits_2_and_keeps_no_partial_checkpoint(tmp_path, capsys, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    out = tmp_path / "run"
    assert_refused(cifar10.main(tiny_args(out)), capsys.readouterr().err, CHECKPOINT_NAME, "No space left")
    assert not (out / CHECKPOINT_NAME).exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# --- damaged checkpoints: refused at load, left untouched -------------------------------------


def test_empty_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(b"")
    assert_refused(cifar10.main(tiny_args(out, "--resume")), capsys.readouterr().err, "corrupt")
    assert (out / CHECKPOINT_NAME).read_bytes() == b""


def finished_run(out: Path, *extra: str) -> dict:
    assert cifar10.main(tiny_args(out, "--epochs", "2", *extra)) == 0
    return load_checkpoint(out / CHECKPOINT_NAME)


@pytest.mark.parametrize("part", ["optimizer", "args"])
def test_checkpoint_without_a_part_is_refused(tmp_path, capsys, part):
    out = tmp_path / "run"
    saved = finished_run(out)
    del saved[part]
    torch.save(saved, out / CHECKPOINT_NAME)
    before = (out / CHECKPOINT_NAME).read_bytes()
    capsys.readouterr()
    assert_refused(cifar10.main(tiny_args(out, "--epochs", "2", "--resume")), capsys.readouterr().err, part)
    assert (out / CHECKPOINT_NAME).read_bytes() == before


@pytest.mark.parametrize("api", ["functional", "adapter"])
def test_momentum_of_the_wrong_shape_is_refused_at_load(tmp_path, capsys, api):
    out = tmp_path / "run"
    saved = finished_run(out, "--api", api)
    saved["epoch"] = 1  # as if interrupted: the resumed run would train epoch 2 with this momentum
    if api == "functional":
        buffers = saved["optimizer"]["momentum_state"]
        buffers[0] = torch.zeros(*buffers[0].shape, 2)
    else:
        state = saved["optimizer"]["sam_sgd"]["state"][0]
        state["momentum_buffer"] = torch.zeros(*state["momentum_buffer"].shape, 2)
    torch.save(saved, out / CHECKPOINT_NAME)
    capsys.readouterr()
    assert_refused(cifar10.main(tiny_args(out, "--epochs", "2", "--api", api, "--resume")), capsys.readouterr().err,
                   "momentum", "left untouched")
    assert load_checkpoint(out / CHECKPOINT_NAME)["epoch"] == 1


def test_resuming_a_finished_run_says_so_and_rewrites_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    finished_run(out)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    capsys.readouterr()
    assert cifar10.main(tiny_args(out, "--epochs", "2", "--resume")) == 0
    err = capsys.readouterr().err
    assert "complete" in err and str(out / "summary.json") in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


# --- what a user expects besides --------------------------------------------------------------


def test_default_warm_up_of_a_short_run_is_half_the_run_with_a_note(capsys):
    assert config.parse_args(["--epochs", "3"]).warmup_epochs == 1
    assert "warm-up of 1 epoch(s)" in capsys.readouterr().err
    assert config.parse_args(["--epochs", "1"]).warmup_epochs == 0
    assert config.parse_args(["--epochs", "3", "--warmup-epochs", "3"]).warmup_epochs == 3  # asked for: kept
    assert config.parse_args(["--epochs", "200"]).warmup_epochs == 5
    assert capsys.readouterr().err.count("note:") == 1


def test_help_shows_every_default(capsys):
    parser = config.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert text.count("(default:") == len(options)
    for flag, default in (("--epochs", "200"), ("--momentum", "0.9"), ("--weight-decay", "0.0005"),
                          ("--nesterov", "False"), ("--batch-size", "128")):
        assert f"(default: {default})" in text, flag


def test_closing_line_names_accuracy_time_and_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert cifar10.main(tiny_args(out)) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert last.startswith("done:") and f"best test acc {summary['best_test_acc']:.4f}" in last
    assert f"final {summary['final_test_acc']:.4f}" in last and "s in total" in last and str(out) in last


def test_tensorboard_logs_every_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert cifar10.main(tiny_args(out, "--epochs", "2", "--tensorboard")) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("test/acc")] == [1, 2]


def test_tensorboard_without_the_package_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    real_find_spec = config.importlib.util.find_spec
    monkeypatch.setattr(config.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    assert_refused(exit_code(tiny_args(tmp_path / "run", "--tensorboard")), capsys.readouterr().err,
                   "pip install", "[tensorboard]")
    assert not (tmp_path / "run").exists()


# --- signals and the run folder's lock (real processes) ---------------------------------------


def start_trainer(out: Path, *extra: str) -> subprocess.Popen:
    # 80 steps per epoch, 3 epochs: long enough to be caught mid-run.
    argv = tiny_args(out, "--synthetic-size", "2560", "--batch-size", "32", "--epochs", "3", "--limit-steps", "80",
                     *extra)
    return subprocess.Popen([sys.executable, "-m", "train.cifar10", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_first_epoch(process: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            return
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"the trainer did not finish an epoch: {process.communicate()}")


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_cleanly_with_the_command_that_resumes(tmp_path, signum, code):
    out = tmp_path / "run"
    process = start_trainer(out)
    wait_for_first_epoch(process, out)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert "Traceback" not in err
    assert f"stopped by {signal.Signals(signum).name}" in err and str(out / CHECKPOINT_NAME) in err
    assert "python -m train.cifar10 " in err and err.rstrip().endswith("--resume")
    assert not (out / ".lock").exists()


@pytest.mark.slow
def test_one_trainer_per_run_folder_and_a_dead_holder_does_not_block(tmp_path, capsys):
    out = tmp_path / "run"
    first = start_trainer(out)
    wait_for_first_epoch(first, out)
    code = cifar10.main(tiny_args(out, "--resume"))  # as a second trainer on the same --out
    assert_refused(code, capsys.readouterr().err, "in use by another trainer", f"pid {first.pid}")
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert (out / ".lock").exists()  # left by the dead trainer ...
    argv = tiny_args(out, "--synthetic-size", "2560", "--batch-size", "32", "--epochs", "3", "--limit-steps", "80")
    assert cifar10.main([*argv, "--resume"]) == 0  # ... and no obstacle to resuming
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (out / ".lock").exists()
