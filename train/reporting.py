"""What a run tells its user: the progress bar, the per-epoch line, the run folder's metrics files,
optional TensorBoard scalars, the summary and the closing line.

Only rank 0 reports (``Reporter(..., is_main=False)`` prints and writes nothing). Files in the run
folder are replaced atomically (temporary file, rename), and a failed write leaves no temporary
file behind and stops the run with a ``RunFolderError`` that says what to do.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from train.checkpoint import CHECKPOINT_NAME, writing

METRICS_NAME, SUMMARY_NAME, ARGS_NAME = "metrics.jsonl", "summary.json", "args.json"


def write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with writing(path):
        try:
            temporary.write_text(text)
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                temporary.unlink()


def write_json(path: Path, obj: Any) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2) + "\n")


def progress_bar(total: int, epoch: int, epochs: int):
    """A tqdm bar on a terminal; None otherwise (logs get one line per epoch instead)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, dynamic_ncols=True)


def make_summary(args, history: list[dict], num_params: int, device: torch.device) -> dict:
    last = history[-1] if history else {}
    # The first epoch of a compiled run includes compilation: leave it out of the throughput.
    steady = history[1:] if len(history) > 1 else history
    return dict(
        model=args.model, optim=args.optim, base=args.base, rho=args.rho, api=args.api, dataset=args.dataset,
        epochs=len(history), parameters=num_params, device=str(device), processes=args.world_size,
        final_test_acc=last.get("test_acc"), best_test_acc=max((r["test_acc"] for r in history), default=None),
        final_train_loss=last.get("train_loss"),
        train_images_per_s=(sum(r["images_per_s"] for r in steady) / len(steady)) if steady else None,
        # The epochs' training and evaluation, and the sharpness measurements made after them.
        total_seconds=sum(r["seconds"] + r.get("sharpness_seconds", 0.0) for r in history),
        **_sharpness(history),
    )


def _sharpness(history: list[dict]) -> dict:
    """The last --sharpness-every measurement (top eigenvalue, trace) and the seconds all of them
    took, if the run made one."""
    measured = [r for r in history if "top_eigenvalue" in r]
    if not measured:
        return {}
    return dict(final_top_eigenvalue=measured[-1]["top_eigenvalue"], final_hessian_trace=measured[-1]["hessian_trace"],
                sharpness_seconds=sum(r["sharpness_seconds"] for r in measured))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def closing_line(summary: dict, out: Path) -> str:
    best = summary["best_test_acc"]
    best_text = "n/a" if best is None else f"{best:.4f}"
    final = summary["final_test_acc"]
    final_text = "n/a" if final is None else f"{final:.4f}"
    measuring = summary.get("sharpness_seconds")
    measuring_text = "" if measuring is None else f" ({measuring:.1f}s of it measuring sharpness)"
    return (f"done: {plural(summary['epochs'], 'epoch')}, best test acc {best_text}, final {final_text}, "
            f"{summary['total_seconds']:.1f}s in total{measuring_text}; files in {out}/ "
            f"({METRICS_NAME}, {SUMMARY_NAME}, {CHECKPOINT_NAME}, {ARGS_NAME})")


def header_line(args, num_params: int, device: torch.device, train_images: int, test_images: int, steps: int) -> str:
    parallel = "" if args.world_size == 1 else f" x {args.world_size} processes (sam_sync={args.sam_sync})"
    parts = (f" m-sharpness={args.m_sharpness}" if args.m_sharpness > 1 else "") + \
            (f" accumulate={args.accumulate}" if args.accumulate > 1 else "") + (" sync-bn" if args.sync_bn else "")
    return (f"{args.model} ({num_params:,} params) {args.optim} base={args.base} api={args.api} on {device}{parallel}"
            f"{' compiled' if args.compile else ''}{' amp=' + args.amp if args.amp else ''}{parts}: "
            f"{args.dataset} {train_images} train / {test_images} test images, {steps} steps/epoch")


class EpochClock:
    """Wall and CPU seconds of an epoch's training (CPU time counts the work done on a shared
    machine, where wall time also counts the waits for other tenants)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.train_seconds = self.train_cpu_seconds = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.wall

    def stop_training(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.train_seconds, self.train_cpu_seconds = self.elapsed(), time.process_time() - self.cpu


def epoch_row(epoch: int, step: int, totals, seen: int, test_loss: float, test_acc: float, lr: float,
              clock: EpochClock) -> dict:
    """The epoch's line of metrics.jsonl; ``seen``: training images of every process."""
    return dict(
        epoch=epoch, step=step, train_loss=totals.loss_sum.item() / seen, train_acc=totals.correct.item() / seen,
        test_loss=test_loss, test_acc=test_acc, lr=lr, skipped_steps=int(totals.skipped_steps.item()),
        seconds=clock.elapsed(), train_seconds=clock.train_seconds, train_cpu_seconds=clock.train_cpu_seconds,
        images_per_s=seen / clock.train_seconds,
    )


def sharpness_text(row: dict) -> str:
    """The epoch line's account of a --sharpness-every measurement (empty for an epoch without one)."""
    if "top_eigenvalue" not in row:
        return ""
    return (f"  sharpness ({row['sharpness_seconds']:.1f}s): top eig {row['top_eigenvalue']:.4g}, "
            f"trace {row['hessian_trace']:.4g} +- {row['hessian_trace_stderr']:.2g}")


class Reporter:
    """Rank 0's voice and files: ``start`` once, ``epoch`` per epoch, ``finish`` at the end."""

    def __init__(self, args, out: Path, is_main: bool):
        self.args, self.out, self.is_main = args, Path(out), is_main
        self.bar = self.tensorboard = None
        self.epoch_number = 0

    def say(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def start(self, history: list[dict], new_run: bool, header: str) -> None:
        """Write args.json (a new run) and the metrics the checkpoint holds (dropping rows of an
        epoch it does not), and open TensorBoard where asked."""
        if not self.is_main:
            return
        if new_run:
            write_json(self.out / ARGS_NAME, vars(self.args))
        write_text_atomically(self.out / METRICS_NAME, "".join(json.dumps(row) + "\n" for row in history))
        if self.args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: scalars of epochs past the checkpoint (a crashed run's) are dropped.
            with writing(self.out / "tensorboard"):
                self.tensorboard = SummaryWriter(str(self.out / "tensorboard"), purge_step=len(history) + 1)
        self.say(header)

    def epoch_started(self, epoch: int, steps: int) -> None:
        self.epoch_number = epoch + 1
        self.bar = progress_bar(steps, epoch, self.args.epochs) if self.is_main else None

    def stepped(self) -> None:
        """One more training step queued: the bar's count moves, nothing is read from the device."""
        if self.bar is not None:
            self.bar.update(1)

    def running(self, steps_done: int, totals, clock: EpochClock) -> None:
        """The bar's running loss, accuracy and speed after ``steps_done`` steps (the totals are read
        only when there is a bar; the trainer calls this only where it reads the device anyway)."""
        if self.bar is not None:
            seen = steps_done * self.args.batch_size
            self.bar.set_postfix(loss=f"{totals.loss_sum.item() / seen:.3f}", acc=f"{totals.correct.item() / seen:.3f}",
                                 img_s=f"{seen / clock.elapsed():.0f}")

    def status(self, doing: str, log: bool = False) -> None:
        """What the epoch does after its steps: in the bar's description on a terminal; as a line
        elsewhere if ``log`` (a wait long enough to look like a hang)."""
        if self.bar is not None:
            self.bar.set_description_str(f"epoch {self.epoch_number}/{self.args.epochs}: {doing}")
        elif log:
            self.say(f"epoch {self.epoch_number}/{self.args.epochs}: {doing} ...")

    def epoch(self, row: dict) -> None:
        """Append the epoch's metrics (after its checkpoint) and print its line."""
        bar, self.bar = self.bar, None
        if bar is not None:
            bar.close()
        if not self.is_main:
            return
        with writing(self.out / METRICS_NAME), open(self.out / METRICS_NAME, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "images_per_s"):
                self.tensorboard.add_scalar(key.replace("_", "/", 1), row[key], row["epoch"])
            self.tensorboard.flush()
        print(f"epoch {row['epoch']}/{self.args.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
              f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}  lr {row['lr']:.4g}  "
              f"{row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s{sharpness_text(row)}",
              file=sys.stderr if bar else sys.stdout, flush=True)

    def finish(self, summary: dict) -> dict:
        if self.is_main:
            write_json(self.out / SUMMARY_NAME, summary)
            print(closing_line(summary, self.out), flush=True)
        self.close()
        return summary

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
