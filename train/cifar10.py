"""Train a CIFAR network with SAM (or plain SGD) on funcsam, the sam.pytorch recipe made fast.

    python -m train.cifar10 --model resnet20 --optim sam            # CIFAR-10, 200 epochs
    python -m train.cifar10 --dataset synthetic --model resnet20 --epochs 3 --synthetic-size 2560

The recipe is the original sam.pytorch one: SGD momentum 0.9, lr 0.1, weight decay 5e-4, batch 128,
cosine schedule after 5 linear warm-up epochs, 200 epochs, pad-4 random crop and horizontal flip.

How it is fast: the data set sits on the device as uint8 and is augmented there, a batch at a time;
with ``--api functional`` (default) one step is one call of a pure function around
``funcsam.sam_step`` (both passes and the update), which ``--compile`` turns into one fullgraph
``torch.compile`` region; the learning rate travels as a 0-dim tensor so the schedule never
recompiles; loss and accuracy are summed on the device and read every ``read_every(steps)`` steps
(the progress bar's count moves every step without reading anything).
``--api adapter`` runs the same recipe through the closure-style ``funcsam.SAMSGD`` optimizer
(``funcsam.SAM`` over ``torch.optim.AdamW`` with ``--base adamw``).

Beyond one batch (``--api functional``): ``torchrun --nproc_per_node N -m train.cifar10 ...`` trains
data-parallel on N processes (NCCL on GPUs, gloo on CPUs). Every rank draws the same global batch
(``--batch-size`` stays the global batch) and trains on its contiguous shard; gradients are averaged
with ``funcsam.distributed.all_reduce_mean`` (``--sam-sync global|local``), BatchNorm statistics
stay per replica unless ``--sync-bn``. Rank 0 alone prints, evaluates and writes files; every rank
resumes from its checkpoint. ``--m-sharpness K`` and ``--accumulate K`` cut each (per-replica)
batch into K parts: ``funcsam.m_sharpness_sam_step`` and ``funcsam.accumulated_sam_step``.

The modules: ``config`` (the command line, validated before anything is created), ``steppers``
(one stepper per API: ``step``, ``params_buffers``, ``state_dict``, ``load_state_dict``),
``checkpoint`` (atomic checkpoints, the checks before a resume, the run folder's lock),
``reporting`` (progress, metrics files, TensorBoard, summary), ``parallel`` (torchrun's collectives),
``data`` and ``models``. This file is the run itself: ``train`` builds, resumes, loops, saves.

Exit codes: 0 done (or the run was already complete), 2 bad arguments / missing data / unusable
checkpoint / run folder unusable or in use / torch.compile failure, 3 training diverged,
130 / 143 stopped by SIGINT / SIGTERM (the message gives the command that resumes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

import funcsam
import funcsam.distributed
from train import checkpoint as ckpt
from train import parallel
from train.config import (PRE_EXISTING_DEFAULTS, RUN_DEFINING_ARGS, UsageError, check_beyond_one_batch, parse_args,
                          pick_device, requested_world_size)
from train.data import Dataset, DatasetUnavailable, load_cifar, make_epoch_plan, make_synthetic, normalize
from train.models import build_model, count_parameters
from train.reporting import SUMMARY_NAME, EpochClock, Reporter, epoch_row, header_line, make_summary
from train.steppers import make_criterion, make_eval_step, make_stepper, memory_format, zero_totals


def read_every(steps_per_epoch: int) -> int:
    """Steps between host reads of the epoch's running totals (the bar's loss, the divergence check).

    A read waits for the device to finish every queued step, so a long epoch reads rarely (every 50
    steps of CIFAR-10's 390); a short one still reads about four times, so that its bar shows a loss
    within the first quarter of the epoch (5000 images in batches of 128: 39 steps, a read every 9).
    It depends on nothing but the epoch's length, not on whether a bar is shown: under torchrun a
    read is a collective, which every rank must make at the same steps."""
    return min(50, max(1, steps_per_epoch // 4))


class TrainingDiverged(Exception):
    """The loss became non-finite for a reason loss scaling does not explain."""


class Stopped(Exception):
    """SIGINT or SIGTERM arrived: the run stops where it is, its last checkpoint intact."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- the run ----------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) the training that ``args`` describes; returns the summary (on every rank)."""
    dp, device = parallel.join(pick_device(args.device))
    args.world_size = dp.world_size  # run-defining: the shards, and so the trajectory, depend on it
    out = Path(args.out)
    report = Reporter(args, out, dp.is_main)
    if args.amp == "fp16" and device.type == "cpu":
        report.say("warning: fp16 autocast on the CPU runs convolutions very slowly (no fast fp16 kernels); "
                   "--amp bf16 is the CPU's fast path")
    with contextlib.ExitStack() as cleanup:
        lock = ckpt.RunLock(out)  # rank 0 holds it for the run; every rank learns if it could not
        lock_failure = parallel.attempt_on_rank_0(dp, lock.acquire, ckpt.RunFolderError)
        cleanup.callback(lock.release)
        cleanup.callback(report.close)
        saved = read_checkpoint(args, out / ckpt.CHECKPOINT_NAME, report)  # every rank reads it
        parallel.agree(dp, lock_failure, ckpt.RunFolderError)
        if saved is not None and saved["epoch"] >= args.epochs and (out / SUMMARY_NAME).exists():
            report.say(f"{out} holds a complete run ({saved['epoch']}/{args.epochs} epochs): nothing to train, "
                       f"nothing rewritten. Its summary: {out / SUMMARY_NAME}")
            return json.loads((out / SUMMARY_NAME).read_text())

        # Data on the device once, as uint8; the batch order and augmentation come per epoch from (seed, epoch).
        data = parallel.on_rank_0_first(dp, lambda: load_dataset(args), DatasetUnavailable)
        (train_images, train_labels), test = ([t.to(device) for t in split] for split in (data.train, data.test))
        mean, std = torch.tensor(data.mean, device=device), torch.tensor(data.std, device=device)
        steps_per_epoch = count_steps(len(train_labels), args)
        total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch

        # The model is initialised from the seed, so every device (and rank) starts from the same weights.
        torch.manual_seed(args.seed)
        model = build_model(args.model, data.num_classes).to(device, memory_format=memory_format(args))
        if args.sync_bn:
            model = funcsam.distributed.convert_sync_batchnorm(model)  # same names: checkpoints load either way
        model.train()
        grad_reduce = funcsam.distributed.all_reduce_mean() if dp.world_size > 1 else None
        stepper = make_stepper(args, model, lambda s: learning_rate(s, total, warmup, args.lr), mean, std, device,
                               grad_reduce, steps_per_epoch=steps_per_epoch)
        eval_step = make_eval_step(model, args, mean, std)
        sharpness_batch = (normalize(train_images[:args.sharpness_images], mean, std), train_labels[:args.sharpness_images])
        start_epoch, history = resume(stepper, saved, out / ckpt.CHECKPOINT_NAME, report)
        every = read_every(steps_per_epoch)

        parallel.barrier(dp)  # every rank has checked (and read) the checkpoint before rank 0 writes anything
        report.start(history, saved is None, header_line(args, count_parameters(model), device, len(train_labels),
                                                          len(test[1]), steps_per_epoch))
        for epoch in range(start_epoch, args.epochs):
            plan = make_epoch_plan(len(train_labels), args.seed, epoch, device)
            totals, clock = zero_totals(device), EpochClock(device)
            report.epoch_started(epoch, steps_per_epoch)
            for i in range(steps_per_epoch):
                rows, *augmentation = batch_of(plan, i, args.batch_size, dp)
                totals = stepper.step(totals, train_images[rows], train_labels[rows], augmentation,
                                      epoch * steps_per_epoch + i)
                report.stepped()
                if (i + 1) % every == 0 or i + 1 == steps_per_epoch:
                    reported = parallel.global_totals(totals, dp.world_size)
                    check_finite(reported, epoch, i)  # the same verdict on every rank
                    report.running(i + 1, reported, clock)
            clock.stop_training()
            step, row = (epoch + 1) * steps_per_epoch, None
            if dp.is_main:  # rank 0's model (its BatchNorm statistics) is the one evaluated and checkpointed
                report.status("evaluating")
                test_loss, test_acc = evaluate(eval_step, model, *stepper.params_buffers(), test,
                                               2 * args.batch_size, args.limit_steps)  # no gradients: twice the batch
                row = epoch_row(epoch + 1, step, reported, steps_per_epoch * args.batch_size, test_loss, test_acc,
                                learning_rate(step - 1, total, warmup, args.lr), clock)
                if measures_sharpness(args, epoch):
                    report.status(f"measuring sharpness on {args.sharpness_images} training images", log=True)
                    row.update(measure_sharpness(model, *stepper.params_buffers(), sharpness_batch, args))
                ckpt.save(out / ckpt.CHECKPOINT_NAME, vars(args), epoch + 1, step, history + [row], stepper)
                report.epoch(row)
            history.append(parallel.share_from_rank_0(row, dp))  # also waits for rank 0's checkpoint
        return report.finish(make_summary(args, history, count_parameters(model), device))


def read_checkpoint(args, path: Path, report: Reporter) -> dict | None:
    """The checkpoint this run resumes (None: a new run); refused unless --resume and the same run."""
    if not path.exists():
        if args.resume:
            report.say(f"--resume: no checkpoint at {path} yet, starting a new run")
        return None
    if not args.resume:
        raise UsageError(f"{path} exists: pass --resume to continue that run, or choose another --out "
                         "(it was left untouched)")
    saved = ckpt.load_checkpoint(path)
    ckpt.check_resumable(saved, vars(args), RUN_DEFINING_ARGS, PRE_EXISTING_DEFAULTS, path)
    return saved


def resume(stepper, saved: dict | None, path: Path, report: Reporter) -> tuple[int, list[dict]]:
    """(first epoch to train, metrics so far): everything the next step reads comes back from ``saved``."""
    if saved is None:
        return 0, []
    stepper.load_state_dict(saved, path)
    ckpt.restore_rng_states(saved["rng"])
    report.say(f"resuming {path} after epoch {saved['epoch']}/{report.args.epochs}")
    return saved["epoch"], list(saved["history"])


def count_steps(num_images: int, args) -> int:
    steps = num_images // args.batch_size  # the ragged tail is dropped: one shape, one graph
    if steps == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {num_images} training images")
    return steps if args.limit_steps is None else min(steps, args.limit_steps)


def batch_of(plan, i: int, batch_size: int, dp) -> list[torch.Tensor]:
    """(rows, crop offsets, flips, cutout centres) of this process's shard of global batch ``i``:
    every rank drew the same plan and keeps its contiguous part."""
    batch = slice(i * batch_size, (i + 1) * batch_size)
    return funcsam.shard_batch((plan.order[batch], plan.crop_offsets[batch], plan.flips[batch],
                                plan.cutout_centres[batch]), dp.rank, dp.world_size)


def load_dataset(args) -> Dataset:
    if args.dataset == "synthetic":
        return make_synthetic(args.seed, args.synthetic_size, max(1, args.synthetic_size // 5))
    try:
        return load_cifar(args.dataset, args.data_dir)
    except OSError as err:  # a read-only or full --data-dir, one that is not a folder
        raise DatasetUnavailable(
            f"--data-dir {args.data_dir} cannot be used: {err.strerror or err} ({err.filename}). "
            "Point --data-dir at a writable folder, or use --dataset synthetic to run offline."
        ) from None


# --- schedule, evaluation, divergence ---------------------------------------------------------


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """lr of (0-based) ``step``: linear from peak/warmup_steps up to peak over the warm-up, then
    peak * (1 + cos(pi * t)) / 2 with t going from 0 to 1 over the remaining steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


def evaluate(eval_step, model, params, buffers, test, batch_size: int, limit: int | None) -> tuple[float, float]:
    """(mean loss, accuracy) over the test split (or its first ``limit`` batches)."""
    images, labels = test
    n = images.shape[0]
    batches = math.ceil(n / batch_size)
    if limit is not None:
        batches = min(batches, limit)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    seen = 0
    model.eval()
    with torch.no_grad():
        for b in range(batches):
            x, y = images[b * batch_size:(b + 1) * batch_size], labels[b * batch_size:(b + 1) * batch_size]
            real = x.shape[0]
            if real < batch_size:  # pad to the compiled shape rather than compile a second one
                x = torch.cat([x, x.new_zeros((batch_size - real, *x.shape[1:]))])
                y = torch.cat([y, y.new_zeros(batch_size - real)])
            valid = torch.arange(batch_size, device=x.device) < real
            batch_loss, batch_correct = eval_step(params, buffers, x, y, valid)
            loss_sum, correct, seen = loss_sum + batch_loss, correct + batch_correct, seen + real
    model.train()
    return loss_sum.item() / seen, correct.item() / seen


def measures_sharpness(args, epoch: int) -> bool:
    """Whether the end of (0-based) ``epoch`` measures sharpness: every --sharpness-every epochs, and the last."""
    return args.sharpness_every > 0 and ((epoch + 1) % args.sharpness_every == 0 or epoch + 1 == args.epochs)


def measure_sharpness(model, params, buffers, batch, args) -> dict:
    """The top Hessian eigenvalue and the Hessian trace of the training loss at ``params`` on ``batch``.

    The model stays in training mode (BatchNorm normalises with the subset's statistics: the loss
    SAM minimises), in fp32; nothing is modified, and the random vectors come from the run's seed
    through their own generator, so the trajectory is the same with or without the measurement."""
    started = time.perf_counter()
    loss_fn = funcsam.make_loss_fn(model, make_criterion(args))
    top = funcsam.top_hessian_eigenvalue(loss_fn, params, buffers, batch, iters=20, seed=args.seed)
    trace = funcsam.hessian_trace(loss_fn, params, buffers, batch, samples=20, seed=args.seed)
    return dict(top_eigenvalue=top.value.item(), hessian_trace=trace.value.item(),
                hessian_trace_stderr=trace.stderr.item(), sharpness_seconds=time.perf_counter() - started)


def check_finite(totals, epoch: int, step_in_epoch: int) -> None:
    diverged = int(totals.diverged_steps.item())
    if diverged:
        raise TrainingDiverged(
            f"training diverged in epoch {epoch + 1} (by step {step_in_epoch + 1} of the epoch): "
            f"{diverged} step(s) had a non-finite loss or gradient that loss scaling does not explain. "
            "The last good checkpoint (end of the previous epoch) was kept. Try a lower --lr or --rho, "
            "or --amp bf16 instead of fp16."
        )


# --- the command ------------------------------------------------------------------------------


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise ``Stopped`` wherever the run is (checkpoints are written atomically,
    so the last one stays whole). Only the main thread can take signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resume_command(argv: list[str]) -> str:
    world = requested_world_size()
    launcher = "python -m train.cifar10" if world == 1 else f"torchrun --nproc_per_node {world} -m train.cifar10"
    return f"{launcher} {shlex.join([*argv, *([] if '--resume' in argv else ['--resume'])])}"


def stopped_message(err: Stopped, args: argparse.Namespace, argv: list[str]) -> str:
    path = Path(args.out) / ckpt.CHECKPOINT_NAME
    if not path.exists():
        return f"stopped by {err}: before the first checkpoint, nothing to resume"
    return f"stopped by {err}: the last checkpoint is {path}; resume with:\n  {resume_command(argv)}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # Errors that every rank meets alike are reported once, by rank 0 (RANK is set by torchrun).
    report = print if os.environ.get("RANK", "0") == "0" else (lambda *_, **__: None)
    try:
        with stop_on_signals():
            check_beyond_one_batch(args, requested_world_size())
            train(args)
    except (UsageError, DatasetUnavailable, ckpt.CheckpointError, ckpt.RunFolderError) as err:
        report(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        report(f"error: {err}", file=sys.stderr)
        return 3
    except Stopped as err:
        report(stopped_message(err, args, argv), file=sys.stderr)
        return 128 + err.signum
    except torch._dynamo.exc.TorchDynamoException as err:
        # An internal compiler failure is torch's, not the user's: say so and how to go on.
        report(f"error: torch.compile (torch {torch.__version__}) could not compile the training step: "
               f"{type(err).__name__}: {ckpt.first_line(err)}\nRerun without --compile (same results, eager speed), "
               "or with another torch release.", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
