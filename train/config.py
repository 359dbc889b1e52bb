"""The run configuration: the command line, validated once, before anything is created.

``parse_args`` returns an ``argparse.Namespace`` whose values are known to be usable: every number
in range, flags that exclude each other refused, the paths usable as folders. A bad value exits
with code 2 and a message naming the flag (argparse's ``error``), so nothing later in the trainer
needs to re-check what a user typed. What the run then records (``args.json``, the checkpoint) is
this namespace, with the values that actually ran (``--optim sgd`` records rho 0; a capped default
warm-up records the capped length).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch

from train.models import MODELS, TIMM_PREFIX, parse_timm_model
from train.sam_modes import SAM_MODES

# Arguments that shape the trajectory: a checkpoint is only resumed when all of them match.
# (--compile, --compile-scope, --compile-mode, --channels-last, --device, --data-dir, --out, --tensorboard may
# change between a run and its resumption: they change how the same steps are computed, not which.)
RUN_DEFINING_ARGS = (
    "model", "optim", "base", "betas", "rho", "adaptive", "api", "epochs", "batch_size", "lr", "momentum",
    "weight_decay", "nesterov", "warmup_epochs", "label_smoothing", "cutout", "amp", "dataset",
    "seed", "limit_steps", "synthetic_size", "sam_sync", "sync_bn", "m_sharpness", "accumulate", "world_size",
    "sam_mode", "sam_every", "sam_start_epoch", "looksam_alpha", "gsam_alpha", "sam_on", "adaptive_delta",
    "fsdp", "rst_p", "rst_p_end", "sam_rho_scale", "select_k",
)
# What a checkpoint written before a run-defining argument existed ran with.
PRE_EXISTING_DEFAULTS = dict(sam_sync="global", sync_bn=False, m_sharpness=1, accumulate=1, world_size=1,
                             base="sgd", betas=[0.9, 0.999], sam_mode="full", sam_every=5, sam_start_epoch=0,
                             looksam_alpha=0.7, gsam_alpha=0.2, sam_on=False, adaptive_delta=0.9, fsdp=False,
                             rst_p=0.5, rst_p_end=None, sam_rho_scale=False,
                             select_k=None)
# The --sam-mode values that select examples (gradient sources), and their default --select-k: B / this.
SELECTING_MODES = {"ksam": 4, "sds": 2}
# The AdamW recipe's learning rate and weight decay, used when --base adamw is given without them.
ADAMW_DEFAULTS = dict(lr=1e-3, weight_decay=0.05)

DEFAULT_WARMUP_EPOCHS = 5  # the recipe's; a run shorter than twice that warms up for half its length


class UsageError(Exception):
    """An argument combination that cannot run; the message says what to change."""


class _Explicit(argparse.Action):
    """Stores the value and remembers that the user typed the flag (the default may be adapted)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"_{self.dest}_given", True)


class _ShortErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose error is two lines, the reason and where the flags are listed, rather
    than the full usage (28 lines) above the one line that matters. Exit code 2, as argparse's."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\nrun with --help for all flags\n")


def build_parser() -> argparse.ArgumentParser:
    p = _ShortErrorParser(
        prog="python -m train.cifar10",
        description="Train a CIFAR network with SAM or SGD (funcsam). Defaults follow sam.pytorch. "
                    "Exit codes: 0 done (or already complete), 2 a usage, data, checkpoint or run-folder "
                    "problem (the message says what to do), 3 training diverged, 130/143 stopped by "
                    "SIGINT/SIGTERM (resumable with --resume).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    main_models = [m for m in MODELS if m != "tiny"]
    p.add_argument("--model", default="resnet20", type=model_name, metavar="|".join(main_models) + "|timm:NAME",
                   help="network; 'tiny' (1.6K parameters) exists for fast tests only; timm:NAME[,key=value,...] "
                        "builds a timm model (pretrained=False), e.g. timm:vit_tiny_patch16_224,img_size=32,patch_size=4")
    p.add_argument("--optim", default="sam", choices=["sam", "sgd"],
                   help="sgd = SAM with rho 0: the base optimizer alone, one pass")
    p.add_argument("--base", default="sgd", choices=["sgd", "adamw"],
                   help="the base optimizer SAM steps with: sgd (torch.optim.SGD's update, the recipe) or adamw "
                        f"(torch.optim.AdamW's; without --lr/--weight-decay it uses lr {ADAMW_DEFAULTS['lr']} and "
                        f"weight decay {ADAMW_DEFAULTS['weight_decay']})")
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("BETA1", "BETA2"),
                   help="AdamW's moment decay rates (--base adamw), each in [0, 1)")
    p.add_argument("--rho", type=float, default=0.05, help="SAM neighbourhood radius, >= 0 (ignored by --optim sgd)")
    p.add_argument("--adaptive", action="store_true", help="ASAM: scale-invariant perturbation (use a larger --rho, e.g. 0.5)")
    p.add_argument("--api", default="functional", choices=["functional", "adapter"],
                   help="functional: pure funcsam.sam_step; adapter: closure-style funcsam.SAMSGD")
    p.add_argument("--epochs", type=int, default=200, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (the ragged last batch is dropped)")
    p.add_argument("--lr", type=float, default=0.1, action=_Explicit, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=0.9, action=_Explicit,
                   help="SGD momentum, >= 0 (>= 1 is accepted with a warning); --base sgd only")
    p.add_argument("--weight-decay", type=float, default=5e-4, action=_Explicit,
                   help="weight decay, >= 0: L2 added to the gradient with --base sgd, decoupled with --base adamw")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (needs --momentum > 0)")
    p.add_argument("--warmup-epochs", type=int, default=DEFAULT_WARMUP_EPOCHS, action=_Explicit,
                   help="linear warm-up, then cosine decay to 0; left at its default, a run shorter than "
                        f"{2 * DEFAULT_WARMUP_EPOCHS} epochs warms up for half its epochs (a note says so)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="in [0, 1]")
    p.add_argument("--cutout", action="store_true", help="16x16 cutout after crop and flip")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (see --compile-scope) and the eval step; adapter: "
                        "compile the model's forward")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the convolution weights and the inputs in channels_last (NHWC) layout (default; "
                        "--no-channels-last for NCHW). On this project's 2-core CPU eager steps ran about a quarter "
                        "faster in it and torch.compile(model) as fast, and a step compiled whole needs it: in NCHW "
                        "inductor transposes every activation of the backward half (README: \"Where the compiled "
                        "step loses\")")
    p.add_argument("--compile-scope", default="auto", choices=["auto", "step", "loss"],
                   help="functional API with --compile: step = the whole step (both passes and the update) as one "
                        "fullgraph region; loss = the loss function (forward and backward graphs of each pass, as "
                        "torch.compile(model)), the SAM arithmetic eager; auto = loss on a CPU in NCHW (measured 18%% "
                        "faster there), step in channels_last (the default), on a GPU (no kernel launches between "
                        "the parts) and with --m-sharpness")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="with --compile, torch.compile's mode for the training step (the eval step keeps the "
                        "default): reduce-overhead replays the step as CUDA graphs (no kernel launch cost; on a "
                        "CPU it compiles as default), max-autotune also benchmarks kernel choices (long compile)")
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                   help="autocast; bare --amp means bf16. fp16 uses dynamic loss scaling (slow on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto = cuda if available")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "synthetic"],
                   help="synthetic: CIFAR-shaped, class-structured images made from --seed; runs offline")
    p.add_argument("--synthetic-size", type=int, default=10000,
                   help="training images of --dataset synthetic (test images: a fifth of it)")
    p.add_argument("--data-dir", default="data", help="where CIFAR is (or is downloaded to)")
    p.add_argument("--out", default="runs/cifar10",
                   help="run folder: checkpoint.pt, metrics.jsonl, args.json, summary.json; one trainer at a time")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint (refused if its arguments differ)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation")
    p.add_argument("--limit-steps", type=int, default=None, metavar="N",
                   help="cap every epoch at N training steps and the evaluation at N batches "
                        "(the schedule spans the steps actually run); for quick tests and benchmarks")
    p.add_argument("--sharpness-every", type=int, default=0, metavar="N",
                   help="every N epochs (and after the last) measure the top Hessian eigenvalue (power iteration, "
                        "20 Hessian-vector products) and the Hessian trace (Hutchinson, 20 samples) of the "
                        "training loss on a fixed subset of --sharpness-images training images; 0 = never")
    p.add_argument("--sharpness-images", type=int, default=256, metavar="K",
                   help="the first K training images (unaugmented) on which --sharpness-every measures")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log every epoch's metrics to --out/tensorboard (needs the [tensorboard] extra)")
    cheaper = p.add_argument_group(
        "cheaper SAM",
        "Ways to keep much of SAM's effect for fewer than two passes per step (funcsam.modes); each mode goes "
        "with --sam-on, --m-sharpness, --accumulate, --amp and data parallelism.",
    )
    cheaper.add_argument("--sam-mode", default="full", choices=list(SAM_MODES),
                         help="full: SAM on every step; every: SAM every --sam-every steps, the base step between; "
                              "late: the base step until --sam-start-epoch, SAM after; looksam: LookSAM, the SAM "
                              "gradient every --sam-every steps and its extra direction reused between; msam: "
                              "momentum-SAM, one pass perturbed along the momentum; gsam: GSAM, SAM with a "
                              "surrogate-gap ascent (--gsam-alpha); adaptive: AE-SAM, SAM only when the squared "
                              "gradient norm is high against its running statistics (not ASAM: that is --adaptive); "
                              "rst: randomized SAM, SAM with probability --rst-p (a hash of --seed and the step); "
                              "ksam: K-SAM, both SAM passes on the --select-k examples of highest loss; sds: ESAM's "
                              "data selection, the second pass on the --select-k examples whose loss rises most")
    cheaper.add_argument("--sam-every", type=int, default=5, metavar="K",
                         help="--sam-mode every / looksam: SAM on steps 0, K, 2K, ...")
    cheaper.add_argument("--sam-rho-scale", action="store_true",
                         help="--sam-mode every: SAM steps perturb with --rho times K (Composer's advice: rho 0.5 at "
                              "interval 10 on ImageNet)")
    cheaper.add_argument("--sam-start-epoch", type=int, default=None, metavar="E",
                         help="--sam-mode late: the first epoch (0-based) with SAM; default: the last tenth of "
                              "the run (at least one epoch)")
    cheaper.add_argument("--looksam-alpha", type=float, default=0.7, help="--sam-mode looksam: the weight of the reused direction")
    cheaper.add_argument("--gsam-alpha", type=float, default=0.2, help="--sam-mode gsam: the weight of the gap ascent")
    cheaper.add_argument("--adaptive-delta", type=float, default=0.9,
                         help="--sam-mode adaptive: the decay of the running mean and variance of the squared gradient norm")
    cheaper.add_argument("--rst-p", type=float, default=0.5, metavar="P",
                         help="--sam-mode rst: the probability of a SAM step (at step 0 with --rst-p-end)")
    cheaper.add_argument("--rst-p-end", type=float, default=None, metavar="P",
                         help="--sam-mode rst: the probability at the run's last step, reached linearly from --rst-p "
                              "(unset: --rst-p throughout)")
    cheaper.add_argument("--select-k", type=int, default=None, metavar="K",
                         help="--sam-mode ksam / sds: the examples per batch (per process) both SAM passes (ksam) "
                              "or the second (sds) use; default: a quarter (ksam) or half (sds) of --batch-size")
    cheaper.add_argument("--sam-on", action="store_true",
                         help="SAM-ON: perturb only the normalisation layers' parameters (with any --sam-mode)")
    beyond = p.add_argument_group(
        "beyond one batch",
        "Under `torchrun --nproc_per_node N -m train.cifar10 ...` the run is data-parallel on N processes "
        "(NCCL on GPUs, gloo on CPUs): --batch-size stays the global batch, each rank trains on its "
        "contiguous 1/N of it, and only rank 0 prints and writes files. --api adapter wraps the model in "
        "DistributedDataParallel.",
    )
    beyond.add_argument("--sam-sync", default="global", choices=["global", "local"],
                        help="with N processes: global = perturb with the averaged gradient (one process "
                             "on the global batch); local = each replica perturbs with its own gradient "
                             "(--api adapter: the first pass under DDP's no_sync())")
    beyond.add_argument("--sync-bn", action="store_true",
                        help="normalise with the BatchNorm statistics of the global batch, across processes "
                             "(funcsam.distributed.convert_sync_batchnorm; --api adapter on CUDA: "
                             "torch.nn.SyncBatchNorm); without it each replica keeps its own")
    beyond.add_argument("--m-sharpness", type=int, default=1, metavar="K",
                        help="m-sharpness: each (per-replica) batch in K parts, each perturbing with its own "
                             "gradient (funcsam.MSharpness); with N processes needs --sam-sync local; --api functional")
    beyond.add_argument("--accumulate", type=int, default=1, metavar="K",
                        help="one SAM step over K micro-batches of each (per-replica) batch "
                             "(funcsam.MicroBatches; the adapter's closure accumulates them): the whole batch's step (exactly so without BatchNorm; "
                             "BatchNorm normalises each micro-batch alone) in 1/K of the activation memory")
    beyond.add_argument("--fsdp", action="store_true",
                        help="with N processes and --api adapter: shard the model with FSDP2 (fully_shard) over "
                             "them; SAM's norms stay global (docs: Sharded training: FSDP2)")
    return p


def model_name(value: str) -> str:
    """``--model``'s type: a name of ``MODELS`` or a timm model that timm knows (argparse's error otherwise)."""
    if value.startswith(TIMM_PREFIX):
        try:
            parse_timm_model(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value
    if value not in MODELS:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(MODELS)} or timm:NAME)")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The validated configuration of ``argv``; exits 2 with a message on the first bad value.
    (The combinations that depend on the number of processes: ``check_beyond_one_batch``.)"""
    p = build_parser()
    args = p.parse_args(argv)
    capped = not vars(args).pop("_warmup_epochs_given", False) and args.warmup_epochs > args.epochs // 2 >= 0
    if capped:  # a short run keeps the recipe's shape: warm up, then decay to 0
        args.warmup_epochs = args.epochs // 2
    try:
        check_numbers(args)
        check_paths(args)
    except UsageError as err:
        p.error(str(err))
    given = {name: vars(args).pop(f"_{name}_given", False) for name in ("lr", "momentum", "weight_decay")}
    if args.base == "adamw":
        for name, value in ADAMW_DEFAULTS.items():
            if not given[name]:
                setattr(args, name, value)
        if given["momentum"] or args.nesterov:
            p.error("--momentum and --nesterov are SGD's: with --base adamw the moments are set by --betas")
    if capped:
        note(f"note: warm-up of {args.warmup_epochs} epoch(s), half of --epochs {args.epochs} (the default "
             f"{DEFAULT_WARMUP_EPOCHS} is longer than that); pass --warmup-epochs to choose")
    if args.momentum >= 1:
        note(f"warning: --momentum {args.momentum} >= 1 lets the update grow without bound; the recipe uses 0.9")
    if args.optim == "sgd":
        args.rho = 0.0  # recorded as what ran, so a checkpoint cannot be resumed as SAM
    return args


def note(message: str) -> None:
    """A line on stderr, from rank 0 only (RANK is set by torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def check_numbers(args: argparse.Namespace) -> None:
    if args.sharpness_every < 0:
        raise UsageError(f"--sharpness-every must be >= 0 (0: never), got {args.sharpness_every}")
    for name in ("epochs", "batch_size", "synthetic_size", "m_sharpness", "accumulate", "sharpness_images"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit_steps is not None and args.limit_steps < 1:
        raise UsageError(f"--limit-steps must be >= 1, got {args.limit_steps}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    for name in ("rho", "momentum", "weight_decay"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):  # NaN fails both
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    check_sam_mode(args)
    check_compile_scope(args)
    if not all(0 <= beta < 1 for beta in args.betas):  # NaN fails too
        raise UsageError(f"--betas must both be in [0, 1), got {args.betas[0]} {args.betas[1]}")
    if not 0 <= args.label_smoothing <= 1:
        raise UsageError(f"--label-smoothing must be in [0, 1], got {args.label_smoothing}")
    if args.nesterov and args.momentum == 0:
        raise UsageError("--nesterov needs --momentum > 0")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise UsageError(f"--warmup-epochs must be in [0, --epochs={args.epochs}], got {args.warmup_epochs}; "
                         "for short runs pass e.g. --warmup-epochs 1")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install -e \".[tensorboard]\" "
                         "(or pip install tensorboard)")


def check_sam_mode(args: argparse.Namespace) -> None:
    """The cheaper-SAM flags; resolves the default --sam-start-epoch (recorded as what ran)."""
    if args.sam_start_epoch is None:
        args.sam_start_epoch = args.epochs - max(1, round(args.epochs / 10)) if args.sam_mode == "late" else 0
    if args.sam_every < 1:
        raise UsageError(f"--sam-every must be >= 1 (1: SAM on every step), got {args.sam_every}")
    if not 0 <= args.sam_start_epoch < args.epochs:
        raise UsageError(f"--sam-start-epoch must be in [0, --epochs={args.epochs}) (0-based: SAM from that epoch on), "
                         f"got {args.sam_start_epoch}")
    for name in ("looksam_alpha", "gsam_alpha"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not 0 <= args.adaptive_delta < 1:
        raise UsageError(f"--adaptive-delta must be in [0, 1), got {args.adaptive_delta}")
    for name in ("rst_p", "rst_p_end"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:  # NaN fails too
            raise UsageError(f"--{name.replace('_', '-')} must be a probability in [0, 1], got {value}")
    if args.sam_rho_scale and args.sam_mode != "every":
        raise UsageError(f"--sam-rho-scale scales rho by --sam-every for --sam-mode every; --sam-mode {args.sam_mode} "
                         "does not take it (pass the rho you want with --rho)")
    check_selection(args)
    if args.sam_mode != "full" and args.optim == "sgd":
        raise UsageError(f"--sam-mode {args.sam_mode} needs --optim sam: --optim sgd is the base optimizer alone")
    if args.sam_mode == "msam" and args.base == "sgd" and args.momentum == 0:
        raise UsageError("--sam-mode msam perturbs along the momentum: it needs --momentum > 0 (or --base adamw)")


def check_selection(args: argparse.Namespace) -> None:
    """--sam-mode ksam / sds and --select-k; resolves the default --select-k (recorded as what ran)."""
    if args.sam_mode not in SELECTING_MODES:
        if args.select_k is not None:
            raise UsageError(f"--select-k is for --sam-mode ksam or sds, not --sam-mode {args.sam_mode}")
        return
    if args.select_k is None:
        args.select_k = max(1, args.batch_size // SELECTING_MODES[args.sam_mode])
    if not 1 <= args.select_k <= args.batch_size:
        raise UsageError(f"--select-k must be in [1, --batch-size={args.batch_size}], got {args.select_k}")
    if args.api != "functional":
        raise UsageError(f"--sam-mode {args.sam_mode} runs in --api functional only (it is a gradient source of "
                         "funcsam.sam_step; with the optimizers, select the batch with funcsam.top_k_examples in "
                         "a loop of your own)")
    if args.accumulate > 1 or args.m_sharpness > 1:
        raise UsageError(f"--sam-mode {args.sam_mode} picks the examples of its passes, which --accumulate and "
                         "--m-sharpness pick as well: use one of them")


def check_compile_scope(args: argparse.Namespace) -> None:
    if args.compile_mode != "default" and not args.compile:
        raise UsageError(f"--compile-mode {args.compile_mode} needs --compile (it is torch.compile's mode)")
    if args.compile_scope == "loss" and args.m_sharpness > 1:
        raise UsageError("--compile-scope loss cannot go with --m-sharpness: its parts vmap the loss function, "
                         "which a compiled function cannot be; use --compile-scope step (or auto)")


def check_paths(args: argparse.Namespace) -> None:
    """--out and --data-dir must be folders or not exist yet (they are created when needed)."""
    folders = [("--out", args.out)] + ([("--data-dir", args.data_dir)] if args.dataset != "synthetic" else [])
    for flag, folder in folders:
        path = Path(folder)
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise UsageError(f"{flag} {folder}: {blocker} is a file, not a folder; choose another {flag}")


def requested_world_size() -> int:
    """The number of processes torchrun started (1 for a plain ``python`` run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_beyond_one_batch(args: argparse.Namespace, world_size: int) -> None:
    """UsageError for a data-parallel / m-sharpness / accumulation combination that cannot run,
    before any process group is joined (every rank refuses alike)."""
    check_fsdp(args, world_size)
    if args.api != "functional" and args.m_sharpness > 1:
        raise UsageError(f"--m-sharpness {args.m_sharpness} needs --api functional (the adapter optimizer has one "
                         "gradient per pass and process; under torchrun, --sam-sync local is m-sharpness with "
                         "m = the per-process batch)")
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


def check_fsdp(args: argparse.Namespace, world_size: int) -> None:
    """UsageError for an --fsdp run that cannot be one: it shards over torchrun's processes, through
    the adapter API, with one backward pass per SAM pass and an eager forward."""
    if not args.fsdp:
        return
    asked = [flag for flag, on in (("--api functional", args.api != "adapter"), ("--compile", args.compile),
                                   (f"--accumulate {args.accumulate}", args.accumulate > 1),
                                   ("--sam-sync local", args.sam_sync == "local"), ("--sync-bn", args.sync_bn),
                                   ("one process", world_size == 1)) if on]
    if asked:
        raise UsageError(f"--fsdp cannot run with {', '.join(asked)}: it shards the model over the processes "
                         "of `torchrun --nproc_per_node N` (N >= 2) and steps with --api adapter, eager, one pass "
                         "at a time")


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)
