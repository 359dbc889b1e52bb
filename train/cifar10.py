"""Train a CIFAR network with SAM (or plain SGD) on funcsam, the sam.pytorch recipe made fast.

    python -m train.cifar10 --model resnet20 --optim sam            # CIFAR-10, 200 epochs
    python -m train.cifar10 --dataset synthetic --model resnet20 --epochs 3 --synthetic-size 2560

The recipe is the original sam.pytorch one: SGD momentum 0.9, lr 0.1, weight decay 5e-4, batch 128,
cosine schedule after 5 linear warm-up epochs, 200 epochs, pad-4 random crop and horizontal flip.

How it is fast: the data set sits on the device as uint8 and is augmented there, a batch at a time;
with ``--api functional`` (default) one step is one call of a pure function around
``funcsam.sam_step`` (both passes and the update), which ``--compile`` turns into one fullgraph
``torch.compile`` region; the learning rate travels as a 0-dim tensor so the schedule never
recompiles; loss and accuracy are summed on the device and read every ``LOG_EVERY`` steps.
``--api adapter`` runs the same recipe through the closure-style ``funcsam.SAMSGD`` optimizer.

Beyond one batch (``--api functional``): ``torchrun --nproc_per_node N -m train.cifar10 ...`` trains
data-parallel on N processes (NCCL on GPUs, gloo on CPUs). Every rank draws the same global batch
(``--batch-size`` stays the global batch) and trains on its contiguous shard; gradients are averaged
with ``funcsam.distributed.all_reduce_mean`` (``--sam-sync global|local``), BatchNorm statistics
stay per replica unless ``--sync-bn``. Rank 0 alone prints, evaluates and writes files; every rank
resumes from its checkpoint. ``--m-sharpness K`` and ``--accumulate K`` cut each (per-replica)
batch into K parts: ``funcsam.m_sharpness_sam_step`` and ``funcsam.accumulated_sam_step``.

Exit codes: 0 done, 2 bad arguments / missing data / unusable checkpoint / torch.compile failure,
3 training diverged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import optree
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call

import funcsam
import funcsam.distributed
from train import checkpoint as ckpt
from train.data import Dataset, DatasetUnavailable, augment, load_cifar, make_epoch_plan, make_synthetic, normalize
from train.models import MODELS, build_model, count_parameters

LOG_EVERY = 50  # steps between host reads of the running loss (one device sync each)

# Arguments that shape the trajectory: a checkpoint is only resumed when all of them match.
# (--compile, --device, --data-dir, --out may change between the interrupted run and its resumption.)
RUN_DEFINING_ARGS = (
    "model", "optim", "rho", "adaptive", "api", "epochs", "batch_size", "lr", "momentum",
    "weight_decay", "nesterov", "warmup_epochs", "label_smoothing", "cutout", "amp", "dataset",
    "seed", "limit_steps", "synthetic_size", "sam_sync", "sync_bn", "m_sharpness", "accumulate", "world_size",
)
# What a checkpoint written before a run-defining argument existed ran with.
PRE_EXISTING_DEFAULTS = dict(sam_sync="global", sync_bn=False, m_sharpness=1, accumulate=1, world_size=1)


class UsageError(Exception):
    """An argument combination that cannot run; the message says what to change."""


class TrainingDiverged(Exception):
    """The loss became non-finite for a reason loss scaling does not explain."""


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train.cifar10",
        description="Train a CIFAR network with SAM or SGD (funcsam). Defaults follow sam.pytorch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    main_models = [m for m in MODELS if m != "tiny"]
    p.add_argument("--model", default="resnet20", choices=list(MODELS), metavar="|".join(main_models),
                   help="network; 'tiny' (1.6K parameters) exists for fast tests only")
    p.add_argument("--optim", default="sam", choices=["sam", "sgd"], help="sgd = SAM with rho 0 (one pass)")
    p.add_argument("--rho", type=float, default=0.05, help="SAM neighbourhood radius (ignored by --optim sgd)")
    p.add_argument("--adaptive", action="store_true", help="ASAM: scale-invariant perturbation (use a larger --rho, e.g. 0.5)")
    p.add_argument("--api", default="functional", choices=["functional", "adapter"],
                   help="functional: pure funcsam.sam_step; adapter: closure-style funcsam.SAMSGD")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--warmup-epochs", type=int, default=5, help="linear warm-up, then cosine decay to 0")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--cutout", action="store_true", help="16x16 cutout after crop and flip")
    p.add_argument("--compile", action="store_true",
                   help="functional: torch.compile the whole step (both passes + update) and the eval "
                        "step, fullgraph; adapter: compile the model's forward")
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                   help="autocast; bare --amp means bf16. fp16 uses dynamic loss scaling (slow on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto = cuda if available")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "synthetic"],
                   help="synthetic: CIFAR-shaped, class-structured images made from --seed; runs offline")
    p.add_argument("--synthetic-size", type=int, default=10000,
                   help="training images of --dataset synthetic (test images: a fifth of it)")
    p.add_argument("--data-dir", default="data", help="where CIFAR is (or is downloaded to)")
    p.add_argument("--out", default="runs/cifar10", help="run folder: checkpoint, metrics.jsonl, args.json, summary.json")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint (refused if its arguments differ)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation")
    p.add_argument("--limit-steps", type=int, default=None, metavar="N",
                   help="cap every epoch at N training steps and the evaluation at N batches "
                        "(the schedule spans the steps actually run); for quick tests and benchmarks")
    beyond = p.add_argument_group(
        "beyond one batch (--api functional)",
        "Under `torchrun --nproc_per_node N -m train.cifar10 ...` the run is data-parallel on N processes "
        "(NCCL on GPUs, gloo on CPUs): --batch-size stays the global batch, each rank trains on its "
        "contiguous 1/N of it, and only rank 0 prints and writes files.",
    )
    beyond.add_argument("--sam-sync", default="global", choices=["global", "local"],
                        help="with N processes: global = perturb with the averaged gradient (one process "
                             "on the global batch); local = each replica perturbs with its own gradient")
    beyond.add_argument("--sync-bn", action="store_true",
                        help="normalise with the BatchNorm statistics of the global batch, across processes "
                             "(funcsam.distributed.convert_sync_batchnorm); without it each replica keeps its own")
    beyond.add_argument("--m-sharpness", type=int, default=1, metavar="K",
                        help="m-sharpness: each (per-replica) batch in K parts, each perturbing with its own "
                             "gradient (funcsam.m_sharpness_sam_step); with N processes needs --sam-sync local")
    beyond.add_argument("--accumulate", type=int, default=1, metavar="K",
                        help="one SAM step over K micro-batches of each (per-replica) batch "
                             "(funcsam.accumulated_sam_step): the whole batch's step (exactly so without BatchNorm; "
                             "BatchNorm normalises each micro-batch alone) in 1/K of the activation memory")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "synthetic_size", "m_sharpness", "accumulate"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.limit_steps is not None and args.limit_steps < 1:
        p.error(f"--limit-steps must be >= 1, got {args.limit_steps}")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        p.error(f"--warmup-epochs must be in [0, --epochs={args.epochs}], got {args.warmup_epochs}; "
                "for short runs pass e.g. --warmup-epochs 1")
    if args.optim == "sgd":
        args.rho = 0.0  # recorded as what ran, so a checkpoint cannot be resumed as SAM
    return args


def requested_world_size() -> int:
    """The number of processes torchrun started (1 for a plain ``python`` run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_beyond_one_batch(args: argparse.Namespace, world_size: int) -> None:
    """UsageError for a data-parallel / m-sharpness / accumulation combination that cannot run,
    before any process group is joined (every rank refuses alike)."""
    if args.api != "functional":
        asked = [flag for flag, on in (("--sam-sync local", args.sam_sync == "local"), ("--sync-bn", args.sync_bn),
                                       (f"--m-sharpness {args.m_sharpness}", args.m_sharpness > 1),
                                       (f"--accumulate {args.accumulate}", args.accumulate > 1),
                                       (f"{world_size} processes (torchrun)", world_size > 1)) if on]
        if asked:
            raise UsageError(f"{', '.join(asked)} need(s) --api functional (the adapter SAMSGD steps one "
                             "process on one batch)")
    if args.m_sharpness > 1 and args.accumulate > 1:
        raise UsageError(f"--m-sharpness {args.m_sharpness} and --accumulate {args.accumulate} cannot be combined: "
                         "keep one of them at 1")
    if args.sync_bn and args.m_sharpness > 1:
        raise UsageError(f"--sync-bn cannot be combined with --m-sharpness {args.m_sharpness}: m-sharpness parts "
                         "normalise with their own statistics by design (ghost BatchNorm)")
    if world_size > 1 and args.m_sharpness > 1 and args.sam_sync != "local":
        raise UsageError(f"--m-sharpness {args.m_sharpness} with {world_size} processes perturbs every replica's "
                         "parts with their own gradients: pass --sam-sync local to say so")
    if args.batch_size % world_size:
        raise UsageError(f"--batch-size {args.batch_size} (the global batch) is not divisible by the "
                         f"{world_size} processes: use a multiple of {world_size}")
    per_replica = args.batch_size // world_size
    where = "" if world_size == 1 else f" per process ({args.batch_size} / {world_size} processes)"
    for flag, parts in (("--m-sharpness", args.m_sharpness), ("--accumulate", args.accumulate)):
        if per_replica % parts:
            raise UsageError(f"{flag} {parts} does not divide the batch of {per_replica}{where}: "
                             f"choose a --batch-size that is a multiple of {world_size * parts}")


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def autocast_dtype(amp: str | None) -> torch.dtype | None:
    return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


# --- schedule ---------------------------------------------------------------------------------


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """lr of (0-based) ``step``: linear from peak/warmup_steps up to peak over the warm-up, then
    peak * (1 + cos(pi * t)) / 2 with t going from 0 to 1 over the remaining steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


# --- the two ways of stepping -----------------------------------------------------------------


class TrainState(NamedTuple):
    """Everything the functional step carries from one step to the next (a pytree of tensors)."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    momentum_state: funcsam.MomentumState
    loss_scale: funcsam.LossScaleState | None  # fp16 only


class TrainTotals(NamedTuple):
    """Running sums over an epoch, kept on the device so that steps need no host sync."""

    loss_sum: torch.Tensor  # fp32, sum over samples of the first-pass loss
    correct: torch.Tensor  # int64, first-pass logits' argmax == label
    diverged_steps: torch.Tensor  # int64, steps whose loss was non-finite (or skipped without loss scaling)
    skipped_steps: torch.Tensor  # int64, steps sam_step skipped (fp16 overflow)


def zero_totals(device: torch.device) -> TrainTotals:
    f, i = dict(dtype=torch.float32, device=device), dict(dtype=torch.int64, device=device)
    return TrainTotals(torch.zeros((), **f), torch.zeros((), **i), torch.zeros((), **i), torch.zeros((), **i))


def add_step_to_totals(totals: TrainTotals, loss, logits, labels, finite, loss_scaling: bool) -> TrainTotals:
    bad_loss = ~torch.isfinite(loss)
    # Skipped steps are routine under fp16 loss scaling (an overflow halves the scale); without it,
    # a non-finite gradient is as much a divergence as a non-finite loss.
    diverged = bad_loss if loss_scaling else bad_loss | ~finite
    return TrainTotals(
        loss_sum=totals.loss_sum + loss.detach().float() * labels.shape[0],
        correct=totals.correct + (logits.detach().argmax(-1) == labels).sum(),
        diverged_steps=totals.diverged_steps + diverged.to(torch.int64),
        skipped_steps=totals.skipped_steps + (~finite).to(torch.int64),
    )


def make_functional_step(model, args, criterion, mean, std, grad_reduce=None) -> Callable:
    """``step(state, totals, images_u8, labels, crop_offsets, flips, cutout_centres, lr, rho)
    -> (state, totals)``: augmentation, both SAM passes and the SGD update, pure.

    The images are this process's shard of the global batch; ``grad_reduce`` (an all-reduce mean
    under data parallelism) averages the gradients across processes. ``--m-sharpness K`` and
    ``--accumulate K`` pick ``m_sharpness_sam_step`` and ``accumulated_sam_step``: one step each,
    so ``--compile`` still makes one fullgraph region of it."""
    loss_fn = funcsam.make_loss_fn(model, criterion, autocast_dtype=autocast_dtype(args.amp))
    m_sharpness, accumulate, sam_sync = args.m_sharpness, args.accumulate, args.sam_sync

    def step(state: TrainState, totals: TrainTotals, images, labels, crop_offsets, flips, cutout_centres, lr, rho):
        inputs = augment(images, crop_offsets, flips, cutout_centres, mean, std, args.cutout)
        common = dict(momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov,
                      adaptive=args.adaptive, loss_scale=state.loss_scale, grad_reduce=grad_reduce)
        if m_sharpness > 1:  # always local: every part perturbs with its own gradient
            out = funcsam.m_sharpness_sam_step(
                state.params, state.buffers, (inputs, labels), loss_fn, rho, lr, state.momentum_state,
                m=m_sharpness, **common,
            )
        elif accumulate > 1:
            out = funcsam.accumulated_sam_step(
                state.params, state.buffers, funcsam.split_batch((inputs, labels), accumulate), loss_fn, rho, lr,
                state.momentum_state, sam_sync=sam_sync, **common,
            )
        else:
            out = funcsam.sam_step(
                state.params, state.buffers, (inputs, labels), loss_fn, rho, lr, state.momentum_state,
                sam_sync=sam_sync, **common,
            )
        totals = add_step_to_totals(totals, out.loss, out.aux, labels, out.finite, state.loss_scale is not None)
        return TrainState(out.params, out.buffers, out.momentum_state, out.loss_scale), totals

    return step


class AdapterParts(NamedTuple):
    optimizer: funcsam.SAMSGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    grad_scaler: torch.amp.GradScaler | None


def make_adapter_step(model, forward, parts: AdapterParts, args, criterion, mean, std) -> Callable:
    """The same step through the closure-style ``SAMSGD``; mutates the model and optimizer."""
    device = model_device(model)
    scaler = parts.grad_scaler

    def step(totals: TrainTotals, images, labels, crop_offsets, flips, cutout_centres) -> TrainTotals:
        inputs = augment(images, crop_offsets, flips, cutout_centres, mean, std, args.cutout)
        first_logits = []

        def closure():
            parts.optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, args.amp):
                logits = forward(inputs)
                loss = criterion(logits, labels)
            (loss if scaler is None else scaler.scale(loss)).backward()
            first_logits.append(logits.detach())
            return loss.detach().float()

        loss = parts.optimizer.step(closure, grad_scaler=scaler)
        if scaler is not None:
            scaler.update()
        parts.scheduler.step()
        return add_step_to_totals(totals, loss, first_logits[0], labels, parts.optimizer.last_step_finite, scaler is not None)

    return step


def make_eval_step(model, args, mean, std) -> Callable:
    """``eval_step(params, buffers, images_u8, labels, valid) -> (loss_sum, correct)`` in eval
    mode; ``valid`` masks out the padding of the last batch so every batch has the same shape."""
    def eval_step(params, buffers, images, labels, valid):
        inputs = normalize(images, mean, std)
        with autocast_context(images.device, args.amp):
            logits = functional_call(model, (params, buffers), (inputs,))
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        correct = (logits.argmax(-1) == labels) & valid
        return torch.where(valid, losses, 0.0).sum(), correct.sum()

    return eval_step


def autocast_context(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(amp))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- evaluation -------------------------------------------------------------------------------


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


# --- checkpoints ------------------------------------------------------------------------------


def tree_to_list(tree) -> list | None:
    return None if tree is None else optree.tree_leaves(tree)


def list_to_tree(template, leaves: list | None, device: torch.device):
    if template is None:
        return None
    spec = optree.tree_structure(template)
    return optree.tree_unflatten(spec, [leaf.to(device) for leaf in leaves])


def check_tensor_dict(saved: dict, expected: dict, what: str, path: Path) -> None:
    if set(saved) != set(expected) or any(saved[k].shape != expected[k].shape for k in expected):
        raise ckpt.CheckpointError(
            f"{path}: its {what} do not fit this model (names or shapes differ). "
            "It was left untouched; use another --out to start over."
        )


# --- progress ---------------------------------------------------------------------------------


def progress_bar(total: int, epoch: int, epochs: int):
    """A tqdm bar on a terminal; None otherwise (logs get one line per epoch instead)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, dynamic_ncols=True)


def write_json(path: Path, obj: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(temporary, path)


def write_metrics(path: Path, history: list[dict]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(temporary, path)


# --- the run ----------------------------------------------------------------------------------


def load_dataset(args) -> Dataset:
    if args.dataset == "synthetic":
        return make_synthetic(args.seed, args.synthetic_size, max(1, args.synthetic_size // 5))
    return load_cifar(args.dataset, args.data_dir)


def load_dataset_rank_0_first(args, dp: funcsam.distributed.DataParallel) -> Dataset:
    """Rank 0 loads (and downloads, if needed) first; the others then read what it left on disk.
    A failure on rank 0 fails every rank, instead of leaving them waiting."""
    if dp.world_size == 1:
        return load_dataset(args)
    data = error = None
    if dp.is_main:
        try:
            data = load_dataset(args)
        except DatasetUnavailable as err:
            error = err
    loaded = torch.tensor([error is None], dtype=torch.int32, device=dp.device)  # NCCL takes device tensors only
    dist.broadcast(loaded, src=0)
    if error is not None:
        raise error
    if not loaded.item():
        raise DatasetUnavailable("rank 0 could not load the data set (its message says why)")
    return data if data is not None else load_dataset(args)


def global_totals(totals: TrainTotals, world_size: int) -> TrainTotals:
    """The epoch's totals over every process: loss and correct summed over the shards; the step
    counts as the worst process saw them (the same steps run everywhere, so every rank decides alike)."""
    if world_size == 1:
        return totals
    sums = torch.stack([totals.loss_sum.double(), totals.correct.double()])  # exact for any epoch's counts
    counts = torch.stack([totals.diverged_steps, totals.skipped_steps])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    return TrainTotals(sums[0].float(), sums[1].to(torch.int64), counts[0], counts[1])


def barrier(dp: funcsam.distributed.DataParallel) -> None:
    if dp.world_size > 1:
        dist.barrier()


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) the training that ``args`` describes; returns the summary (on every rank)."""
    check_beyond_one_batch(args, requested_world_size())
    device = pick_device(args.device)
    # Under torchrun: join the process group (gloo for --device cpu even where a GPU exists).
    dp = funcsam.distributed.init_data_parallel("nccl" if device.type == "cuda" else "gloo")
    if dp.world_size > 1:
        device = dp.device
    args.world_size = dp.world_size  # run-defining: the shards, and so the trajectory, depend on it
    say = print if dp.is_main else (lambda *_, **__: None)  # only rank 0 prints and writes files
    if args.amp == "fp16" and device.type == "cpu":
        say("warning: fp16 autocast on the CPU runs convolutions very slowly (no fast fp16 kernels); "
            "--amp bf16 is the CPU's fast path", file=sys.stderr)
    # Every rank checks and reads the checkpoint itself; nothing is written before all have.
    out = Path(args.out)
    checkpoint_path = out / ckpt.CHECKPOINT_NAME
    saved = None
    if args.resume and not checkpoint_path.exists():
        say(f"--resume: no checkpoint at {checkpoint_path} yet, starting a new run", file=sys.stderr)
    if checkpoint_path.exists():
        if not args.resume:
            raise UsageError(
                f"{checkpoint_path} exists: pass --resume to continue that run, or choose another --out "
                "(it was left untouched)"
            )
        saved = ckpt.load_checkpoint(checkpoint_path)
        saved_args = {**PRE_EXISTING_DEFAULTS, **saved["args"]}
        if saved_args["world_size"] != dp.world_size:  # not a flag: say how to match it
            raise ckpt.CheckpointError(
                f"{checkpoint_path} belongs to a run on {saved_args['world_size']} process(es), this one has "
                f"{dp.world_size}: the shards, and so the trajectory, would differ. Resume it with "
                f"`torchrun --nproc_per_node {saved_args['world_size']}` (1: plain python), or use another --out. "
                "The checkpoint was left untouched."
            )
        ckpt.check_same_run(saved_args, vars(args), RUN_DEFINING_ARGS, checkpoint_path)

    # Data: on the device once, as uint8; the batch order and augmentation come per epoch from (seed, epoch).
    data = load_dataset_rank_0_first(args, dp)
    train_images, train_labels = (t.to(device) for t in data.train)
    test = tuple(t.to(device) for t in data.test)
    mean = torch.tensor(data.mean, device=device)
    std = torch.tensor(data.std, device=device)
    steps_per_epoch = train_images.shape[0] // args.batch_size  # the ragged tail is dropped: one shape, one graph
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {train_images.shape[0]} training images")
    if args.limit_steps is not None:
        steps_per_epoch = min(steps_per_epoch, args.limit_steps)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch

    # Model: initialised on the CPU from the seed so that every device (and every rank) starts from
    # the same weights.
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.num_classes).to(device)
    if args.sync_bn:
        model = funcsam.distributed.convert_sync_batchnorm(model)  # same names: checkpoints load either way
    model.train()
    reduce = funcsam.distributed.all_reduce_mean() if dp.world_size > 1 else None
    criterion = lambda logits, y: F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)  # noqa: E731
    compile_fn = (lambda f: torch.compile(f, fullgraph=True)) if args.compile else (lambda f: f)
    eval_step = compile_fn(make_eval_step(model, args, mean, std))
    rho: float | torch.Tensor = 0 if args.optim == "sgd" else torch.tensor(args.rho, device=device)
    lr = torch.tensor(learning_rate(0, total_steps, warmup_steps, args.lr), device=device)

    state = parts = None
    if args.api == "functional":
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}
        loss_scale = funcsam.init_loss_scale(device=device) if args.amp == "fp16" else None
        state = TrainState(params, buffers, funcsam.init_momentum(params), loss_scale)
        step = compile_fn(make_functional_step(model, args, criterion, mean, std, grad_reduce=reduce))
    else:
        optimizer = funcsam.SAMSGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
            nesterov=args.nesterov, rho=args.rho, adaptive=args.adaptive, model=model,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: learning_rate(s, total_steps, warmup_steps, args.lr) / args.lr
        )
        scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
        parts = AdapterParts(optimizer, scheduler, scaler)
        # loss.backward() cannot live inside a fullgraph region: compile the forward only.
        forward = torch.compile(model) if args.compile else model
        step = make_adapter_step(model, forward, parts, args, criterion, mean, std)

    def current_params_buffers():
        if state is not None:
            return state.params, state.buffers
        return ({k: v.detach() for k, v in model.named_parameters()},
                {k: v.detach() for k, v in model.named_buffers()})

    # Resume: everything the next step reads comes back from the checkpoint.
    start_epoch, history = 0, []
    if saved is not None:
        params, buffers = current_params_buffers()
        check_tensor_dict(saved["params"], params, "parameters", checkpoint_path)
        check_tensor_dict(saved["buffers"], buffers, "buffers", checkpoint_path)
        if state is not None:
            state = TrainState(
                params={k: saved["params"][k].to(device) for k in params},
                buffers={k: saved["buffers"][k].to(device) for k in buffers},
                momentum_state=list_to_tree(state.momentum_state, saved["optimizer"]["momentum_state"], device),
                loss_scale=list_to_tree(state.loss_scale, saved["optimizer"]["loss_scale"], device),
            )
        else:
            with torch.no_grad():
                for k, v in params.items():
                    v.copy_(saved["params"][k])
                for k, v in buffers.items():
                    v.copy_(saved["buffers"][k])
            parts.optimizer.load_state_dict(saved["optimizer"]["sam_sgd"])
            parts.scheduler.load_state_dict(saved["optimizer"]["lr_scheduler"])
            if parts.grad_scaler is not None:
                parts.grad_scaler.load_state_dict(saved["optimizer"]["grad_scaler"])
        ckpt.restore_rng_states(saved["rng"])
        start_epoch, history = saved["epoch"], list(saved["history"])
        say(f"resuming {checkpoint_path} after epoch {start_epoch}/{args.epochs}", file=sys.stderr)

    barrier(dp)  # every rank has checked (and read) the checkpoint before rank 0 writes anything
    if dp.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if saved is None:
            write_json(out / "args.json", vars(args))
        write_metrics(out / "metrics.jsonl", history)  # drops rows of an epoch the checkpoint does not hold
    parallel = "" if dp.world_size == 1 else f" x {dp.world_size} processes (sam_sync={args.sam_sync})"
    parts_note = (f" m-sharpness={args.m_sharpness}" if args.m_sharpness > 1 else "") + \
                 (f" accumulate={args.accumulate}" if args.accumulate > 1 else "") + (" sync-bn" if args.sync_bn else "")
    say(f"{args.model} ({count_parameters(model):,} params) {args.optim} api={args.api} on {device}{parallel}"
        f"{' compiled' if args.compile else ''}{' amp=' + args.amp if args.amp else ''}{parts_note}: "
        f"{args.dataset} {train_images.shape[0]} train / {test[0].shape[0]} test images, "
        f"{steps_per_epoch} steps/epoch", file=sys.stderr)

    eval_batch = 2 * args.batch_size  # no gradients: twice the batch fits
    step_index = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        plan = make_epoch_plan(train_images.shape[0], args.seed, epoch, device)
        totals = zero_totals(device)
        bar = progress_bar(steps_per_epoch, epoch, args.epochs) if dp.is_main else None
        started, started_cpu = time.perf_counter(), time.process_time()
        for i in range(steps_per_epoch):
            batch = slice(i * args.batch_size, (i + 1) * args.batch_size)
            # Every rank drew the same plan: it keeps its contiguous shard of the global batch.
            rows, *augmentation = funcsam.shard_batch(
                (plan.order[batch], plan.crop_offsets[batch], plan.flips[batch], plan.cutout_centres[batch]),
                dp.rank, dp.world_size,
            )
            if state is not None:
                lr.fill_(learning_rate(step_index, total_steps, warmup_steps, args.lr))  # in place: no recompile
                state, totals = step(state, totals, train_images[rows], train_labels[rows], *augmentation, lr, rho)
            else:
                totals = step(totals, train_images[rows], train_labels[rows], *augmentation)
            step_index += 1
            if (i + 1) % LOG_EVERY == 0 or i + 1 == steps_per_epoch:
                reported = global_totals(totals, dp.world_size)
                check_finite(reported, epoch, i)  # the same verdict on every rank
                if bar is not None:
                    seen = (i + 1) * args.batch_size
                    bar.set_postfix(loss=f"{reported.loss_sum.item() / seen:.3f}",
                                    acc=f"{reported.correct.item() / seen:.3f}",
                                    img_s=f"{seen / (time.perf_counter() - started):.0f}", refresh=False)
                    bar.update(i + 1 - bar.n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - started
        # CPU time of this process (all its threads): on a shared machine it measures the work done,
        # where wall time also counts the waits for other tenants.
        train_cpu_seconds = time.process_time() - started_cpu
        if bar is not None:
            bar.close()

        params, buffers = current_params_buffers()
        row = None
        if dp.is_main:  # rank 0's model (its BatchNorm statistics) is the one checkpointed and evaluated
            test_loss, test_acc = evaluate(eval_step, model, params, buffers, test, eval_batch, args.limit_steps)
            seen = steps_per_epoch * args.batch_size  # the global batch: images of every process
            row = dict(
                epoch=epoch + 1, step=step_index,
                train_loss=reported.loss_sum.item() / seen, train_acc=reported.correct.item() / seen,
                test_loss=test_loss, test_acc=test_acc,
                lr=learning_rate(step_index - 1, total_steps, warmup_steps, args.lr),
                skipped_steps=int(reported.skipped_steps.item()),
                seconds=time.perf_counter() - started, train_seconds=train_seconds,
                train_cpu_seconds=train_cpu_seconds, images_per_s=seen / train_seconds,
            )
            save_checkpoint(checkpoint_path, args, epoch + 1, step_index, history + [row], params, buffers, state, parts)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"epoch {epoch + 1}/{args.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                  f"test loss {test_loss:.4f} acc {test_acc:.4f}  lr {row['lr']:.4g}  "
                  f"{row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s", file=sys.stderr if bar else sys.stdout,
                  flush=True)
        history.append(share_from_rank_0(row, dp))  # also waits for rank 0's checkpoint

    summary = make_summary(args, history, count_parameters(model), device)
    if dp.is_main:
        write_json(out / "summary.json", summary)
    return summary


def share_from_rank_0(obj: Any, dp: funcsam.distributed.DataParallel) -> Any:
    """Rank 0's ``obj`` on every rank (a small picklable value)."""
    if dp.world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, device=dp.device)
    return holder[0]


def check_finite(totals: TrainTotals, epoch: int, step_in_epoch: int) -> None:
    diverged = int(totals.diverged_steps.item())
    if diverged:
        raise TrainingDiverged(
            f"training diverged in epoch {epoch + 1} (by step {step_in_epoch + 1} of the epoch): "
            f"{diverged} step(s) had a non-finite loss or gradient that loss scaling does not explain. "
            "The last good checkpoint (end of the previous epoch) was kept. Try a lower --lr or --rho, "
            "or --amp bf16 instead of fp16."
        )


def save_checkpoint(path, args, epoch, step, history, params, buffers, state, parts) -> None:
    """Everything a resumed run needs to continue bit-for-bit."""
    if state is not None:
        optimizer = dict(momentum_state=tree_to_list(state.momentum_state), loss_scale=tree_to_list(state.loss_scale))
    else:
        optimizer = dict(
            sam_sgd=parts.optimizer.state_dict(), lr_scheduler=parts.scheduler.state_dict(),
            grad_scaler=None if parts.grad_scaler is None else parts.grad_scaler.state_dict(),
        )
    ckpt.save_atomically(
        dict(args=vars(args), epoch=epoch, step=step, history=history, params=params, buffers=buffers,
             optimizer=optimizer, rng=ckpt.rng_states()),
        path,
    )


def make_summary(args, history: list[dict], num_params: int, device: torch.device) -> dict:
    last = history[-1] if history else {}
    # The first epoch of a compiled run includes compilation: leave it out of the throughput.
    steady = history[1:] if len(history) > 1 else history
    return dict(
        model=args.model, optim=args.optim, rho=args.rho, api=args.api, dataset=args.dataset,
        epochs=len(history), parameters=num_params, device=str(device), processes=args.world_size,
        final_test_acc=last.get("test_acc"), best_test_acc=max((r["test_acc"] for r in history), default=None),
        final_train_loss=last.get("train_loss"),
        train_images_per_s=(sum(r["images_per_s"] for r in steady) / len(steady)) if steady else None,
        total_seconds=sum(r["seconds"] for r in history),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Errors that every rank meets alike are reported once, by rank 0 (RANK is set by torchrun).
    report = print if os.environ.get("RANK", "0") == "0" else (lambda *_, **__: None)
    try:
        train(args)
    except (UsageError, DatasetUnavailable, ckpt.CheckpointError) as err:
        report(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        report(f"error: {err}", file=sys.stderr)
        return 3
    except torch._dynamo.exc.TorchDynamoException as err:
        # An internal compiler failure is torch's, not the user's: say so and how to go on.
        first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        report(f"error: torch.compile (torch {torch.__version__}) could not compile the training step: "
               f"{type(err).__name__}: {first_line}\nRerun without --compile (same results, eager speed), "
               "or with another torch release.", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
