"""What a run shows its user while it trains: the bar moves every step while the loss is read from
the device only every few steps, the sharpness measurement is announced, timed, printed and counted
in the run's total, and the closing line counts epochs in good English."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train.cifar10 as cifar10
from train import reporting

REPO = Path(__file__).resolve().parents[1]


def tiny_args(out: Path, *extra: str) -> list[str]:
    # 640 images in batches of 64: 10 steps an epoch, a read of the totals every 2.
    return ["--dataset", "synthetic", "--model", "tiny", "--synthetic-size", "640", "--batch-size", "64",
            "--epochs", "1", "--warmup-epochs", "0", "--device", "cpu", "--no-channels-last", "--out", str(out),
            *extra]


@pytest.mark.parametrize("steps, every", [(1, 1), (3, 1), (10, 2), (39, 9), (200, 50), (390, 50), (5000, 50)])
def test_a_short_epoch_is_read_about_four_times_a_long_one_every_50_steps(steps, every):
    assert cifar10.read_every(steps) == every


class RecordingBar:
    """Stands in for tqdm and writes down, in order, what the trainer does to it."""

    def __init__(self, events: list):
        self.n, self.events = 0, events

    def update(self, n: int) -> None:
        self.n += n
        self.events.append(("update", n))

    def set_postfix(self, **values) -> None:
        self.events.append(("postfix", self.n, sorted(values)))

    def set_description_str(self, text: str) -> None:
        self.events.append(("status", text))

    def close(self) -> None:
        self.events.append(("close",))


def test_the_bar_moves_every_step_and_the_host_reads_the_device_every_n_steps(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(reporting, "progress_bar", lambda total, epoch, epochs: RecordingBar(events))
    real_check_finite = cifar10.check_finite

    def check_finite(totals, epoch, step_in_epoch):  # the divergence check: the read that syncs
        events.append(("read", step_in_epoch + 1))
        real_check_finite(totals, epoch, step_in_epoch)

    real_item = torch.Tensor.item

    def item(tensor):  # a value the host reads: a device sync on a GPU
        # funcsam's checks of lr and rho read them only where they live on the CPU (never a sync).
        if sys._getframe(1).f_globals["__name__"] != "funcsam.hyperparameters":
            events.append(("item",))
        return real_item(tensor)

    monkeypatch.setattr(cifar10, "check_finite", check_finite)
    monkeypatch.setattr(torch.Tensor, "item", item)
    assert cifar10.main(tiny_args(tmp_path / "run")) == 0
    monkeypatch.undo()

    # From the bar's first step to the evaluation: two steps with nothing read, then one read.
    training = events[events.index(("update", 1)):events.index(("status", "epoch 1/1: evaluating"))]
    read = [("item",)] * 3  # the divergence count, then the loss and accuracy sums the bar shows
    assert training == [event for n in range(2, 11, 2) for event in
                        [("update", 1), ("update", 1), ("read", n), *read, ("postfix", n, ["acc", "img_s", "loss"])]]


def test_the_real_bar_draws_counts_loss_and_the_sharpness_status(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cifar10.main(tiny_args(tmp_path / "run", "--sharpness-every", "1", "--sharpness-images", "16")) == 0
    drawn = terminal.getvalue()
    assert "epoch 1/1:" in drawn and "10/10" in drawn and "loss=" in drawn
    assert "epoch 1/1: measuring sharpness on 16 training images: 100%" in drawn  # the bar's description
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    epoch_line = next(line for line in drawn.splitlines() if "train loss" in line)  # printed below the bar
    assert (f"sharpness ({row['sharpness_seconds']:.1f}s): top eig {row['top_eigenvalue']:.4g}, "
            f"trace {row['hessian_trace']:.4g} +- ") in epoch_line


def test_sharpness_is_announced_quiet_printed_and_counted_in_the_total(tmp_path):
    """In a fresh process (torch warns once per process), as a user runs it, without a terminal."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "train.cifar10", *tiny_args(out, "--limit-steps", "2", "--sharpness-every", "1",
                                                           "--sharpness-images", "16")],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "torch.jit.script" not in result.stderr and "Warning" not in result.stderr, result.stderr
    assert "epoch 1/1: measuring sharpness on 16 training images ..." in result.stderr
    row = json.loads((out / "metrics.jsonl").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sharpness_seconds"] == row["sharpness_seconds"] > 0
    assert summary["total_seconds"] == pytest.approx(row["seconds"] + row["sharpness_seconds"])
    epoch_line, closing = result.stdout.strip().splitlines()[-2:]
    assert f"top eig {row['top_eigenvalue']:.4g}" in epoch_line
    assert closing.startswith("done: 1 epoch, ")
    assert f"{summary['total_seconds']:.1f}s in total ({row['sharpness_seconds']:.1f}s of it measuring sharpness)" \
        in closing


def test_closing_line_counts_epochs_and_leaves_sharpness_out_when_none_was_measured(tmp_path):
    summary = dict(epochs=2, best_test_acc=0.5, final_test_acc=0.25, total_seconds=3.0)
    line = reporting.closing_line(summary, tmp_path)
    assert line.startswith("done: 2 epochs, best test acc 0.5000, final 0.2500, 3.0s in total; ")
    assert reporting.closing_line({**summary, "epochs": 1}, tmp_path).startswith("done: 1 epoch, ")


def test_total_seconds_count_every_epoch_and_every_measurement():
    rows = [dict(epoch=1, seconds=2.0, sharpness_seconds=10.0, top_eigenvalue=3.0, hessian_trace=9.0,
                 test_acc=0.5, train_loss=1.0, images_per_s=100.0),
            dict(epoch=2, seconds=3.0, test_acc=0.6, train_loss=0.9, images_per_s=100.0),
            dict(epoch=3, seconds=4.0, sharpness_seconds=20.0, top_eigenvalue=2.0, hessian_trace=8.0,
                 test_acc=0.7, train_loss=0.8, images_per_s=100.0)]
    args = cifar10.parse_args(["--epochs", "3"])
    args.world_size = 1
    summary = reporting.make_summary(args, rows, 10, torch.device("cpu"))
    assert summary["total_seconds"] == 39.0 and summary["sharpness_seconds"] == 30.0
    assert (summary["final_top_eigenvalue"], summary["final_hessian_trace"]) == (2.0, 8.0)
    assert "sharpness_seconds" not in reporting.make_summary(args, rows[1:2], 10, torch.device("cpu"))
