"""The cheaper SAM modes against the base optimizer and full SAM: cost per step, test accuracy, sharpness.

    python -m bench.bench_modes --dataset synthetic|digits|digits_resnet20|both|all [--seeds 3]
                                [--out bench/results/modes_{dataset}.json] [--quick] [--threads 1]
                                [--modes every2 msam ...] [--set FIELD=VALUE ...]
    python -m bench.bench_modes --table bench/results/modes_digits.json ...    # the tables of saved results

The goal this measures (the cheaper-SAM issue): a mode at <= 1.25x the base optimizer's cost that keeps
>= 80% of full SAM's reduction of the top Hessian eigenvalue, with a test accuracy at most 0.3 points
below full SAM's. Three data sets: a synthetic CIFAR-shaped set with the trainer's tiny CNN, and
scikit-learn's digits both flat with an MLP and upsampled to 3 x 16 x 16 with the trainer's ResNet-20
(the same split). For each data set and seed, every mode
trains the same model from the same initialisation on the same batches with the same lr schedule
(SGD, momentum 0.9, cosine to 0) and SAM's rho (MSAM and SAM-ON also at a larger rho, as their papers
tune it apart), and the table reports for each mode

    passes/step     forward+backward passes per training step, counted at the loss function (base 1, SAM 2)
    cost × base     amortised step time / the base step's time, from interleaved timing (below)
    test acc        mean ± std (n - 1) over the seeds; Δ acc vs base / vs SAM: the paired per-seed difference
    top eigenvalue  funcsam.top_hessian_eigenvalue of the training loss on a fixed subset of the training
                    images, model in train mode (BatchNorm on the subset's statistics), at most 20 power
                    iterations (12 for ResNet-20; each run records whether it converged), mean ± std
    kept            (lambda_base - lambda_mode) / (lambda_base - lambda_SAM) on the seed means: the share of
                    full SAM's reduction of the top eigenvalue the mode keeps

Timing. After training, one process steps every mode round-robin over the same batches (the mode order
rotates each round), each step timed alone, eagerly on the CPU. A step's kind is how many passes it
made (1 or 2); each mode's median time per kind is weighted by how often the training runs took that
kind, which amortises schedules: every-5 is (1 median SAM step + 4 median base steps) / 5. The rounds
visit the first and the last step indices of a run, so that every schedule (late phase included) shows
both kinds; the host-side schedule and AE-SAM's read of its decision are inside the timed call. The
ratio is to the base step (``sam_step`` with the Python number rho = 0: one pass). Passes are counted at
the mean-reduced loss function: K-SAM's two passes are over its k examples, and its and SDS's
selecting forwards (per-example losses, no gradient) are not counted, but they are in the timing.

Threads: keep ``--threads 1`` on a shared CPU. With 2 threads on the 2 cores that other jobs also
load, OpenMP's workers spin against them: a ResNet-20 step took 2-3 s instead of 0.08 s.

Each data set writes a JSON file with every number behind its table (per seed) and the machine load.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import funcsam
from train.data import epoch_generator, make_synthetic
from train.models import init_conv_and_linear, resnet20, tiny

GOAL_COST, GOAL_KEPT = 1.25, 0.80
GOAL = (f"a mode at <= {GOAL_COST}x the base optimizer's cost that keeps >= {GOAL_KEPT:.0%} of full SAM's "
        "reduction of the top Hessian eigenvalue")
# A mode that stops fitting also lowers the eigenvalue (LookSAM at alpha 0.7 here), so a mode meets the
# goal only if its mean test accuracy is at most this far below full SAM's (0.3 points).
ACCURACY_SLACK = 0.003


# ---------------------------------------------------------------------------------------------------
# Settings: one per data set
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    model: str  # a key of MODELS
    train_size: int  # synthetic: images drawn; digits: what the split leaves (1797 - test_size)
    test_size: int
    batch_size: int
    epochs: int
    lr: float  # peak; cosine decay to 0 over the run
    rho: float  # full SAM's radius, and every mode's unless scaled below
    weight_decay: float
    sharpness_images: int  # the first K training images, where the top eigenvalue is measured
    timing_rounds: int  # steps per mode in the interleaved timing
    late_fraction: float = 0.2  # late-phase SAM: the last 20% of the steps
    every_ks: tuple[int, ...] = (2, 5)
    looksam_k: int = 5  # the LookSAM paper's k = 5 and alpha = 0.7; 0.1 as well, because 0.7 underfits here
    looksam_alphas: tuple[float, ...] = (0.7, 0.1)
    # MSAM at SAM's rho, and at 5x: its ascent follows the momentum, not g, so the paper tunes its own rho.
    msam_rho_scales: tuple[float, ...] = (1.0, 5.0)
    gsam_alpha: float = 0.2  # the GSAM authors' CIFAR-10 example
    sam_on_rho_scale: float = 5.0  # SAM-ON perturbs only the norm layers; the paper's rho is larger too
    # Composer's advice for intervals: each SAM step perturbs with rho * k (every(k, scale_rho=True)).
    every_scaled_ks: tuple[int, ...] = (5, 10)
    # RST (randomized switching): a constant p, and the paper's preferred rising schedule from 0 to p_end.
    rst_ps: tuple[float, ...] = (0.2, 0.5)
    rst_rising_p_end: float = 0.4  # p_t from 0 to 0.4: 1.2 passes a step on average, as every-5
    # K-SAM both passes, and ESAM's data selection the second pass, on k = fraction * batch examples.
    ksam_fractions: tuple[float, ...] = (0.25, 0.125)
    sds_fractions: tuple[float, ...] = (0.25,)
    eigen_iters: int = 20  # the most power iterations of the top-eigenvalue meter (it stops at rel. change 1e-3)
    image_size: int = 0  # digits for a CNN: 8 x 8 upsampled to image_size x image_size, 3 channels; 0: flat 64


SETTINGS = {
    # 4096 CIFAR-shaped images (train.data.make_synthetic, unaugmented) and train.models' tiny CNN
    # (1.6K params, two conv-BN stages): a run takes 5-10 s on one core, and the base optimizer
    # reaches ~91% test accuracy. rho 0.05 / 0.1 / 0.2 took the top eigenvalue from 3.8 to 2.9 / 2.4 / 1.9.
    "synthetic": Setting(model="tiny", train_size=4096, test_size=1024, batch_size=128, epochs=15, lr=0.1,
                         rho=0.1, weight_decay=5e-4, sharpness_images=512, timing_rounds=120),
    # sklearn's digits (8 x 8, 1797 images, bundled in the wheel), a fixed stratified 75/25 split,
    # and an MLP with BatchNorm (27K params). lr 0.02: at 0.1 the training loss reaches ~0 and with
    # it the Hessian (top eigenvalue 0.04), which leaves SAM nothing to measurably reduce.
    "digits": Setting(model="mlp", train_size=1347, test_size=450, batch_size=64, epochs=30, lr=0.02,
                      rho=0.1, weight_decay=5e-4, sharpness_images=512, timing_rounds=200),
    # The same digits and split, upsampled (bilinear) to 3 x 16 x 16 for the trainer's ResNet-20 (270K
    # params). 16, not 32: on the shared 2-core CPU a 32 x 32 step costs 4x a 16 x 16 one (0.28 s against
    # 0.075 s, one thread), and 3 seeds of a dozen modes would not fit an hour. --set image_size=32 runs the
    # full size (bench/results/modes_digits_resnet20_32.json: training split with --seed-list, then --merge).
    # lr 0.01: at 0.05 (2 seeds) the base optimizer ends at a top eigenvalue of 1.6-1.8, and full SAM
    # at rho 0.05, 0.1 or 0.2 did not lower it; at 0.01 full SAM lowers it from 23-34 to 14-25 (97% test accuracy).
    "digits_resnet20": Setting(model="resnet20", train_size=1347, test_size=450, batch_size=64, epochs=6, lr=0.01,
                               rho=0.1, weight_decay=5e-4, sharpness_images=256, timing_rounds=16, eigen_iters=12,
                               image_size=16),
}
# --quick: the same code path, a smoke run (the numbers are noise): about 2 min for all three data sets on
# one loaded core, most of it ResNet-20 (at 8 x 8, one epoch).
QUICK = dict(epochs=2, sharpness_images=128, timing_rounds=10)
QUICK_SIZES = {"synthetic": dict(train_size=1024, test_size=256),
               "digits_resnet20": dict(epochs=1, sharpness_images=32, timing_rounds=4, eigen_iters=3, image_size=8)}


# ---------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------


def digits_mlp(num_classes: int = 10) -> nn.Module:
    """64 pixels -> 128 -> 128 -> 10, BatchNorm after each hidden layer (so SAM-ON has layers to perturb)."""
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                          nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, num_classes))
    init_conv_and_linear(model)
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {"tiny": tiny, "mlp": digits_mlp, "resnet20": resnet20}


class Problem(NamedTuple):
    """A data set, normalised float tensors on the CPU, and the model every mode trains."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    sharpness_batch: tuple[torch.Tensor, torch.Tensor]
    model: nn.Module


def synthetic_data(setting: Setting) -> tuple[tuple, tuple]:
    data = make_synthetic(seed=0, train_size=setting.train_size, test_size=setting.test_size)
    mean, std = torch.tensor(data.mean)[:, None, None], torch.tensor(data.std)[:, None, None]

    def scaled(split):
        return (split.images.float() / 255 - mean) / std, split.labels

    return scaled(data.train), scaled(data.test)


def digits_data(setting: Setting) -> tuple[tuple, tuple]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise SystemExit("--dataset digits needs scikit-learn: pip install -e '.[bench]'") from error
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=setting.test_size,
                                                        stratify=labels, random_state=0)
    if setting.image_size:
        return digits_images(x_train, y_train, setting.image_size), digits_images(x_test, y_test, setting.image_size,
                                                                                  statistics_of=x_train)
    # Per-pixel statistics of the training split; the border pixels are constant, hence the floor.
    mean, std = x_train.mean(0), x_train.std(0).clip(min=1.0)

    def as_tensors(x, y):
        return torch.tensor((x - mean) / std, dtype=torch.float32), torch.tensor(y)

    return as_tensors(x_train, y_train), as_tensors(x_test, y_test)


def upsampled_digits(x, size: int) -> torch.Tensor:
    """(N, 64) digits in 0..16 -> (N, 3, size, size): bilinear upsampling of the 8 x 8 image, its one
    channel repeated three times (the trainer's models take RGB)."""
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.expand(-1, 3, -1, -1).contiguous()


def digits_images(x, y, size: int, statistics_of=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsampled digits, normalised by the mean and std over all pixels of ``statistics_of`` (the
    training split; default ``x`` itself)."""
    reference = upsampled_digits(x if statistics_of is None else statistics_of, size)
    return (upsampled_digits(x, size) - reference.mean()) / reference.std(), torch.tensor(y)


def make_problem(name: str, setting: Setting) -> Problem:
    train, test = (synthetic_data if name == "synthetic" else digits_data)(setting)  # digits, digits_resnet20
    sharpness = (train[0][: setting.sharpness_images], train[1][: setting.sharpness_images])
    return Problem(train, test, sharpness, MODELS[setting.model]())


def batches(train: tuple, batch_size: int, seed: int, epoch: int):
    """The epoch's shuffled full batches, a pure function of (seed, epoch) as in the trainer."""
    images, labels = train
    order = torch.randperm(len(labels), generator=epoch_generator(seed, epoch))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield images[index], labels[index]


def steps_per_run(problem: Problem, setting: Setting) -> int:
    return (len(problem.train[1]) // setting.batch_size) * setting.epochs


def cosine_lr(setting: Setting, total_steps: int) -> Callable[[int], float]:
    return lambda t: setting.lr * 0.5 * (1 + math.cos(math.pi * t / total_steps))


# ---------------------------------------------------------------------------------------------------
# The modes: each is init(params) -> state and step(params, buffers, batch, lr, state, t) -> SAMStepOutput
# ---------------------------------------------------------------------------------------------------


class Mode(NamedTuple):
    label: str  # the table's name
    init: Callable[[dict], Any]
    step: Callable[..., funcsam.SAMStepOutput]  # (params, buffers, batch, lr, state, t), t the 0-based step


class CountedLoss:
    """``loss_fn`` counting its calls: under torch.func each call is one forward and backward pass."""

    def __init__(self, loss_fn: Callable):
        self.loss_fn, self.calls = loss_fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.loss_fn(*args)


def build_modes(setting: Setting, model: nn.Module, loss_fn: Callable, total_steps: int) -> tuple[dict, list]:
    """``({key: Mode}, notes)``; the notes say which optional modes this funcsam lacks."""
    base = funcsam.sgd(momentum=0.9, weight_decay=setting.weight_decay)
    rho = setting.rho
    late = funcsam.late(total_steps - round(setting.late_fraction * total_steps))
    look_every = funcsam.every(setting.looksam_k)

    def plain(step_fn, rho_, **options):
        return lambda p, b, batch, lr, s, t: step_fn(p, b, batch, loss_fn, rho_, lr, s, base=base, **options)

    def scheduled(schedule):
        return lambda p, b, batch, lr, s, t: funcsam.scheduled_sam_step(
            p, b, batch, loss_fn, rho, lr, s, step=t, schedule=schedule, base=base)

    def looksam(alpha):
        return lambda p, b, batch, lr, s, t: funcsam.looksam_step(
            p, b, batch, loss_fn, rho, lr, s, take_sam=look_every.takes_sam(t), alpha=alpha, base=base)

    modes = {
        # The Python number 0 is sam_step's one-pass base step: SGD with momentum, nothing else.
        "base": Mode("base (SGD, momentum 0.9)", base.init, plain(funcsam.sam_step, 0)),
        "sam": Mode(f"full SAM (rho {rho})", base.init, plain(funcsam.sam_step, rho)),
    }
    for k in setting.every_ks:
        modes[f"every{k}"] = Mode(f"every-{k}", base.init, scheduled(funcsam.every(k)))
    modes["late"] = Mode(f"late phase (last {setting.late_fraction:.0%})", base.init, scheduled(late))
    for alpha in setting.looksam_alphas:
        modes[f"looksam_a{alpha:g}"] = Mode(f"LookSAM (k={setting.looksam_k}, alpha={alpha:g})",
                                            lambda p: funcsam.init_looksam(base, p), looksam(alpha))
    for scale in setting.msam_rho_scales:
        modes[f"msam_x{scale:g}"] = Mode(f"MSAM (rho {scale * rho:g})", base.init,
                                         plain(funcsam.msam_step, scale * rho))
    modes["gsam"] = Mode(f"GSAM (alpha={setting.gsam_alpha})", base.init,
                         plain(funcsam.gsam_step, rho, alpha=setting.gsam_alpha))
    modes.update(new_modes(setting, model, loss_fn, base, total_steps))
    notes = []
    for key, build in (("aesam", _adaptive_mode), ("samon", _sam_on_mode)):
        mode = build(setting, model, loss_fn, base, total_steps)
        if isinstance(mode, str):
            notes.append(mode)
        else:
            modes[key] = mode
    return modes, notes


def new_modes(setting: Setting, model: nn.Module, loss_fn: Callable, base: Any, total_steps: int) -> dict:
    """every(k, scale_rho=True), RST, K-SAM and ESAM's data selection, through ``sam_step(mode=, source=)``."""
    rho, batch_size = setting.rho, setting.batch_size
    per_example = funcsam.make_loss_fn(model, lambda logits, y: F.cross_entropy(logits, y, reduction="none"))

    def through_sam_step(label, mode=None, source=None):
        init = base.init if mode is None else (lambda p: mode.init_state(base, p))
        return Mode(label, init, lambda p, b, batch, lr, s, t: funcsam.sam_step(
            p, b, batch, loss_fn, rho, lr, s, base=base, mode=mode, source=source,
            take_sam=True if mode is None else mode.takes_sam(t, s)))

    modes = {}
    for k in setting.every_scaled_ks:
        modes[f"every{k}_scaled"] = through_sam_step(f"every-{k}, rho × {k} (rho {k * rho:g})",
                                                     funcsam.every(k, scale_rho=True))
    for p in setting.rst_ps:
        modes[f"rst_p{p:g}"] = through_sam_step(f"RST (p {p:g})", funcsam.RST(p, seed=0))
    p_end = setting.rst_rising_p_end
    modes[f"rst_rising{p_end:g}"] = through_sam_step(
        f"RST (p 0 → {p_end:g})", funcsam.RST(0.0, seed=0, p_end=p_end, total_steps=total_steps))
    for fraction in setting.ksam_fractions:
        k = max(1, round(fraction * batch_size))
        modes[f"ksam_k{k}"] = through_sam_step(f"K-SAM (k {k} of {batch_size})",
                                               source=funcsam.TopK(k, per_example))
    for fraction in setting.sds_fractions:
        k = max(1, round(fraction * batch_size))
        modes[f"sds_k{k}"] = through_sam_step(f"ESAM's selection, SDS (k {k} of {batch_size})",
                                              source=funcsam.SDS(k, per_example))
    return modes


# --- Modes another change adds: included when the funcsam that runs has them ----------------------


def _find(name: str, module: str) -> Any:
    """``funcsam.<name>``, else ``funcsam.<module>.<name>``, else None."""
    if hasattr(funcsam, name):
        return getattr(funcsam, name)
    try:
        return getattr(importlib.import_module(f"funcsam.{module}"), name, None)
    except ImportError:
        return None


def _adaptive_mode(setting, model, loss_fn, base, total_steps) -> Mode | str:
    """AE-SAM (funcsam.AESAM): SAM where ||g||^2 is high against its running mean and variance;
    its decision is read on the host (``bool(state.take_next)``) inside the timed step."""
    step_fn, init, threshold = (_find(n, "policy") for n in ("adaptive_sam_step", "init_adaptive", "linear_threshold"))
    if step_fn is None or init is None or threshold is None:
        return "AE-SAM: not included, funcsam has no adaptive_sam_step / init_adaptive / linear_threshold"

    def step(p, b, batch, lr, s, t):
        return step_fn(p, b, batch, loss_fn, setting.rho, lr, s, take_sam=bool(s.take_next),
                       threshold=threshold(t, total_steps), base=base)

    return Mode("AE-SAM (delta 0.9, c 1 -> -1)", lambda p: init(base, p), step)


def _sam_on_mode(setting, model, loss_fn, base, total_steps) -> Mode | str:
    """SAM-ON: sam_step perturbing only the normalisation layers' parameters (its own rho)."""
    mask_fn = _find("norm_layer_mask", "sam_on")
    if mask_fn is None or "perturb_mask" not in inspect.signature(funcsam.sam_step).parameters:
        return "SAM-ON: not included, funcsam has no sam_on.norm_layer_mask / sam_step(perturb_mask=...)"
    mask = mask_fn(model)
    rho = setting.sam_on_rho_scale * setting.rho
    return Mode(f"SAM-ON (rho {rho:g})", base.init, lambda p, b, batch, lr, s, t: funcsam.sam_step(
        p, b, batch, loss_fn, rho, lr, s, base=base, perturb_mask=mask))


# ---------------------------------------------------------------------------------------------------
# Training and measuring one run
# ---------------------------------------------------------------------------------------------------


def train_run(mode: Mode, problem: Problem, setting: Setting, seed: int, counted: CountedLoss,
              lr_at: Callable[[int], float]) -> dict:
    params, buffers = initial_point(problem, setting, seed)
    state = mode.init(params)
    kinds, t, start = Counter(), 0, time.perf_counter()
    problem.model.train()
    for epoch in range(setting.epochs):
        for batch in batches(problem.train, setting.batch_size, seed, epoch):
            before = counted.calls
            out = mode.step(params, buffers, batch, lr_at(t), state, t)
            kinds[counted.calls - before] += 1
            params, buffers, state = out.params, out.buffers, out.momentum_state
            t += 1
    seconds = time.perf_counter() - start
    # The meter differentiates the uncounted loss: its passes are not training's.
    top = funcsam.top_hessian_eigenvalue(counted.loss_fn, params, buffers, problem.sharpness_batch,
                                         iters=setting.eigen_iters, seed=0)
    return dict(test_acc=accuracy(problem, params, buffers), top_eigenvalue=float(top.value),
                eigen_iterations=top.iterations, eigen_converged=top.converged, final_loss=float(out.loss), steps=t,
                steps_by_passes={str(k): v for k, v in sorted(kinds.items())}, train_seconds=round(seconds, 2))


def initial_point(problem: Problem, setting: Setting, seed: int) -> tuple[dict, dict]:
    """Fresh (params, buffers) from ``seed``: every mode of a seed starts from the same point."""
    torch.manual_seed(seed)
    fresh = MODELS[setting.model]()
    return ({k: v.detach() for k, v in fresh.named_parameters()}, {k: v.detach() for k, v in fresh.named_buffers()})


@torch.no_grad()
def accuracy(problem: Problem, params: dict, buffers: dict) -> float:
    """Test accuracy in eval mode (BatchNorm on its running statistics)."""
    model, (images, labels) = problem.model, problem.test
    model.eval()
    try:
        logits = torch.func.functional_call(model, (params, buffers), (images,))
    finally:
        model.train()
    return float((logits.argmax(1) == labels).float().mean())


# ---------------------------------------------------------------------------------------------------
# Interleaved timing
# ---------------------------------------------------------------------------------------------------


def time_modes(modes: dict, problem: Problem, setting: Setting, counted: CountedLoss, total_steps: int,
               lr_at: Callable[[int], float]) -> dict[str, dict[int, list[float]]]:
    """``{key: {passes: [seconds of each timed step of that kind]}}``, modes stepped round-robin."""
    rounds = min(setting.timing_rounds, total_steps)
    # The first and last step indices of a run: both kinds of step of every schedule occur.
    indices = list(range(rounds // 2)) + list(range(total_steps - (rounds - rounds // 2), total_steps))
    per_epoch = len(problem.train[1]) // setting.batch_size
    data = {}  # step t's batch in seed 0's run, only for the timed steps (all of them would not fit)
    for epoch in sorted({t // per_epoch for t in indices}):
        for i, batch in enumerate(batches(problem.train, setting.batch_size, 0, epoch)):
            if epoch * per_epoch + i in indices:
                data[epoch * per_epoch + i] = batch
    params, buffers = initial_point(problem, setting, 0)
    carry = {key: [params, buffers, mode.init(params)] for key, mode in modes.items()}
    problem.model.train()

    def step(key: str, t: int, batch) -> tuple[int, float]:
        p, b, s = carry[key]
        before, start = counted.calls, time.perf_counter()
        out = modes[key].step(p, b, batch, lr_at(t), s, t)
        seconds = time.perf_counter() - start
        carry[key] = [out.params, out.buffers, out.momentum_state]
        return counted.calls - before, seconds

    keys = list(modes)
    for key in keys:  # warm-up: allocator and first-call costs stay out of the medians
        for t in (indices[0], indices[-1]):
            step(key, t, data[t])
    times = {key: {} for key in keys}
    for r, t in enumerate(indices):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            passes, seconds = step(key, t, data[t])
            times[key].setdefault(passes, []).append(seconds)
    return times


def amortised_seconds(step_times: dict[int, list[float]], steps_by_passes: Counter,
                      fallback: dict[int, float]) -> tuple[float, bool]:
    """Sum over kinds of (share of training steps of that kind) x (median time of that kind);
    a kind training took but timing never saw (possible for AE-SAM) takes ``fallback``'s median."""
    total, used_fallback, seconds = sum(steps_by_passes.values()), False, 0.0
    for passes, count in steps_by_passes.items():
        if passes in step_times:
            median = statistics.median(step_times[passes])
        else:
            median, used_fallback = fallback[passes], True
        seconds += count / total * median
    return seconds, used_fallback


# ---------------------------------------------------------------------------------------------------
# One data set: train every mode on every seed, time, summarise
# ---------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def run_dataset(name: str, setting: Setting, seeds: list[int], keys: list[str] | None, timing: bool = True,
                trained: dict | None = None) -> dict:
    """Train every mode on every seed, time them interleaved, summarise. ``timing=False`` stops after training
    and returns the partial result that ``--merge`` completes; ``trained`` (from ``--merge``) skips training."""
    problem = make_problem(name, setting)
    counted = CountedLoss(funcsam.make_loss_fn(problem.model, F.cross_entropy))
    total_steps = steps_per_run(problem, setting)
    lr_at = cosine_lr(setting, total_steps)
    modes, notes = build_modes(setting, problem.model, counted, total_steps)
    if keys:
        modes = {k: mode for k, mode in modes.items() if k in ("base", "sam") or any(k.startswith(x) for x in keys)}
    if trained is not None:  # the saved runs' modes, in their order
        if set(trained) - set(modes):
            raise SystemExit(f"--merge: this code builds no mode {sorted(set(trained) - set(modes))}")
        modes = {key: modes[key] for key in trained}
    load = {"before": os.getloadavg()}
    print(f"\n== {name}: {setting.model}, {len(problem.train[1])} train / {len(problem.test[1])} test images, "
          f"{total_steps} steps, seeds {seeds}, modes {', '.join(modes)}", flush=True)
    for note in notes:
        print(f"   {note}")

    runs = trained if trained is not None else {key: [] for key in modes}
    for seed in seeds if trained is None else []:
        for key, mode in modes.items():
            run = train_run(mode, problem, setting, seed, counted, lr_at)
            runs[key].append(run | dict(seed=seed))
            print(f"   seed {seed} {key:12s} acc {run['test_acc']:.4f}  top eig {run['top_eigenvalue']:8.3f}  "
                  f"passes {run['steps_by_passes']}  {run['train_seconds']:.1f} s", flush=True)
    load["after_training"] = os.getloadavg()
    settings = dataclasses.asdict(setting) | dict(
        total_steps=total_steps, seeds=len(seeds), seed_list=list(seeds), train_images=len(problem.train[1]),
        test_images=len(problem.test[1]), params=sum(p.numel() for p in problem.model.parameters()))
    if not timing:
        return dict(dataset=name, partial=True, settings=settings, machine=machine(load), runs=runs)

    start = time.perf_counter()
    times = time_modes(modes, problem, setting, counted, total_steps, lr_at)
    load["after_timing"] = os.getloadavg()
    print(f"   interleaved timing: {time.perf_counter() - start:.1f} s, load {load['after_timing'][0]:.2f}")
    results = summarise(modes, runs, times)
    reduction = results["base"]["top_eigenvalue_mean"] - results["sam"]["top_eigenvalue_mean"]
    return dict(dataset=name, goal=GOAL, settings=settings, sam_reduces_eigenvalue=reduction > 0,
                not_included=notes, machine=machine(load), modes=results)


def merged_runs(paths: list[str]) -> tuple[str, Setting, list[int], dict]:
    """The training runs of ``--no-timing`` results (one data set, one setting, disjoint seeds), in seed order."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    for path, part in zip(paths, parts):
        if not part.get("partial"):
            raise SystemExit(f"--merge takes the files of --no-timing runs; {path} is a finished result")
    first = parts[0]["settings"]
    fields = {f.name for f in dataclasses.fields(Setting)}
    for path, part in zip(paths, parts):
        s = part["settings"]
        if part["dataset"] != parts[0]["dataset"] or any(s[f] != first[f] for f in fields):
            raise SystemExit(f"--merge: {path} is of another data set or setting than {paths[0]}")
    seeds = sorted(seed for part in parts for seed in part["settings"]["seed_list"])
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--merge: a seed occurs in two files ({seeds})")
    runs = {key: sorted((run for part in parts for run in part["runs"][key]), key=lambda run: run["seed"])
            for key in parts[0]["runs"]}
    setting = Setting(**{f: tuple(first[f]) if isinstance(first[f], list) else first[f] for f in fields})
    return parts[0]["dataset"], setting, seeds, runs


def summarise(modes: dict, runs: dict, times: dict) -> dict:
    """Per mode: the amortised cost ratio, accuracy and eigenvalue statistics, the kept share, the goal."""
    fallback = {1: statistics.median(times["base"][1]), 2: statistics.median(times["sam"][2])}
    results = {}
    for key, mode in modes.items():
        kinds = Counter()
        for run in runs[key]:
            kinds.update({int(k): v for k, v in run["steps_by_passes"].items()})
        seconds, used_fallback = amortised_seconds(times[key], kinds, fallback)
        accs, eigs = [r["test_acc"] for r in runs[key]], [r["top_eigenvalue"] for r in runs[key]]
        results[key] = dict(
            label=mode.label,
            passes_per_step=sum(k * v for k, v in kinds.items()) / sum(kinds.values()),
            cost_x_base=seconds / fallback[1],
            amortised_step_ms=1000 * seconds,
            median_step_ms_by_passes={str(k): 1000 * statistics.median(v) for k, v in sorted(times[key].items())},
            timed_steps_by_passes={str(k): len(v) for k, v in sorted(times[key].items())},
            cost_used_fallback=used_fallback,
            test_acc=accs, test_acc_mean=mean_std(accs)[0], test_acc_std=mean_std(accs)[1],
            top_eigenvalue=eigs, top_eigenvalue_mean=mean_std(eigs)[0], top_eigenvalue_std=mean_std(eigs)[1],
            runs=runs[key],
        )
    base, sam = results["base"], results["sam"]
    reduction = base["top_eigenvalue_mean"] - sam["top_eigenvalue_mean"]
    accuracy_floor = sam["test_acc_mean"] - ACCURACY_SLACK
    for key, r in results.items():
        # Paired per seed (the same initialisation and batches), so the std is that of the difference.
        for name, reference in (("base", base), ("sam", sam)):
            diffs = [a - b for a, b in zip(r["test_acc"], reference["test_acc"])]
            r[f"test_acc_minus_{name}"] = diffs
            r[f"test_acc_minus_{name}_mean"], r[f"test_acc_minus_{name}_std"] = mean_std(diffs)
        r["kept"] = ((base["top_eigenvalue_mean"] - r["top_eigenvalue_mean"]) / reduction if reduction > 0
                     else float("nan"))
        # Per seed too (the same initialisation and batches in all three runs), to show the spread.
        r["kept_by_seed"] = [(b - m) / (b - s) if b > s else float("nan") for b, s, m in
                             zip(base["top_eigenvalue"], sam["top_eigenvalue"], r["top_eigenvalue"])]
        r["cost_and_kept_met"] = bool(key != "sam" and r["cost_x_base"] <= GOAL_COST and r["kept"] >= GOAL_KEPT)
        r["meets_goal"] = r["cost_and_kept_met"] and r["test_acc_mean"] >= accuracy_floor
    return results


def machine(load: dict) -> dict:
    return dict(torch=torch.__version__, funcsam=funcsam.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), cpus=os.cpu_count(),
                load_average_1_5_15={k: [round(x, 2) for x in v] for k, v in load.items()})


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def table(result: dict) -> str:
    s = result["settings"]
    load = result["machine"]["load_average_1_5_15"]
    lines = [
        f"### {result['dataset']}: {s['model']} ({s['params']} params), {s['train_images']} train / "
        f"{s['test_images']} test images, {s['epochs']} epochs ({s['total_steps']} steps, batch {s['batch_size']}), "
        f"lr {s['lr']} cosine, rho {s['rho']}, {s['seeds']} seeds",
        "",
        f"Goal: {GOAL}, with a mean test accuracy at most {100 * ACCURACY_SLACK:g} points below full SAM's. "
        "✅ marks a mode that meets it; ⚠️ one that meets cost and share but loses more accuracy "
        "(it flattens by underfitting). Δ acc: the paired per-seed difference in points, mean ± std.",
        "",
        "| mode | passes/step | cost × base | test acc (mean ± std) | Δ acc vs base | Δ acc vs SAM "
        "| top eigenvalue (mean ± std) | share of full SAM's eigenvalue reduction kept | goal |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for key, r in result["modes"].items():
        kept = "—" if math.isnan(r["kept"]) else f"{r['kept']:.0%}"
        if key in ("base", "sam"):
            kept += " (by definition)"
        lines.append(
            f"| {r['label']} | {r['passes_per_step']:.2f} "
            f"| {r['cost_x_base']:.2f}{'*' if r['cost_used_fallback'] else ''} "
            f"| {100 * r['test_acc_mean']:.1f} ± {100 * r['test_acc_std']:.1f} % "
            f"| {points(r['test_acc_minus_base_mean'], r['test_acc_minus_base_std'])} "
            f"| {points(r['test_acc_minus_sam_mean'], r['test_acc_minus_sam_std'])} "
            f"| {r['top_eigenvalue_mean']:.3f} ± {r['top_eigenvalue_std']:.3f} | {kept} "
            f"| {'✅' if r['meets_goal'] else '⚠️' if r['cost_and_kept_met'] else ''} |")
    lines.append("")
    if not result["sam_reduces_eigenvalue"]:
        lines.append("Full SAM did not lower the mean top eigenvalue here: the kept share is undefined.")
    if any(r["cost_used_fallback"] for r in result["modes"].values()):
        lines.append("* a kind of step the timing did not see took the base's (1 pass) or full SAM's (2 passes) "
                     "median.")
    lines.append(eigen_convergence(result))
    for note in result["not_included"]:
        lines.append(f"- {note}")
    lines.append(f"Load average (1 min) before / after training / after timing: "
                 f"{load['before'][0]} / {load['after_training'][0]} / {load['after_timing'][0]} "
                 f"on {result['machine']['cpus']} CPUs, {result['machine']['threads']} torch thread(s).")
    return "\n".join(lines)


def eigen_convergence(result: dict) -> str:
    """How many runs' power iterations settled (relative change < 1e-3) within the allowed iterations."""
    runs = [run for r in result["modes"].values() for run in r["runs"]]
    converged = [run["eigen_iterations"] for run in runs if run["eigen_converged"]]
    iters = result["settings"].get("eigen_iters", 20)
    settled = f", after {min(converged)}-{max(converged)} of them" if converged else ""
    return (f"Top eigenvalue: power iteration converged (relative change < 1e-3) in {len(converged)} of "
            f"{len(runs)} runs within {iters} iterations{settled}; the others report the last Rayleigh quotient.")


def points(mean: float | None, std: float | None) -> str:
    """A difference of accuracies (fractions) in points, ``+0.4 ± 0.3``."""
    mean, std = (float("nan") if v is None else v for v in (mean, std))
    return f"{100 * mean:+.1f} ± {100 * std:.1f}"


def json_safe(value: Any) -> Any:
    """NaN (a std over one seed, an undefined kept share) as null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def nan_for_null(value: Any) -> Any:
    """The inverse of :func:`json_safe`: a saved result's nulls back to NaN, for :func:`table`."""
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {k: nan_for_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_for_null(v) for v in value]
    return value


def parse_overrides(parser: argparse.ArgumentParser, pairs: list[str]) -> dict:
    """``["lr=0.05", "every_ks=2,10"]`` -> ``{"lr": 0.05, "every_ks": (2, 10)}``, typed by Setting's defaults."""
    example = SETTINGS["synthetic"]
    overrides = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if not hasattr(example, name) or not text:
            fields = ", ".join(f.name for f in dataclasses.fields(Setting))
            parser.error(f"--set takes FIELD=VALUE with FIELD one of {fields}; got {pair!r}")
        default = getattr(example, name)
        if isinstance(default, tuple):
            overrides[name] = tuple(type(default[0])(v) for v in text.split(","))
        else:
            overrides[name] = type(default)(text)
    return overrides


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="both", choices=[*SETTINGS, "both", "all"],
                        help="both: synthetic and digits (the MLP); all: those and digits_resnet20")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (init and batch order); >= 2 for a std")
    parser.add_argument("--out", default="bench/results/modes_{dataset}.json",
                        help="JSON path; {dataset} is replaced by the data set's name ('' to write nothing)")
    parser.add_argument("--seed-list", type=int, nargs="+", default=None, metavar="SEED",
                        help="these seeds instead of 0 .. N-1 (to split one data set's training over processes)")
    parser.add_argument("--no-timing", action="store_true",
                        help="train only and write the runs; --merge times and summarises such files together")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="the --no-timing files of one data set and setting: their runs, timed now and summarised")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 epochs, small sets, 2 seeds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared CPU, 2 threads spin against other jobs)")
    parser.add_argument("--modes", nargs="+", default=None,
                        help="modes to run, by key prefix (base and sam always run): every2 every5 every5_scaled "
                             "every10_scaled late looksam msam gsam aesam samon rst_p0.2 rst_p0.5 rst_rising ksam sds")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="override a Setting field for every data set run, e.g. --set lr=0.05 rho=0.2 epochs=10")
    parser.add_argument("--table", nargs="+", default=None, metavar="JSON",
                        help="print the tables of saved results (files this script wrote) and exit")
    args = parser.parse_args(argv)
    if args.merge and (args.no_timing or args.seed_list):
        parser.error("--merge takes its seeds from the files and times them: leave out --no-timing and --seed-list")
    if args.table:
        for path in args.table:
            print(table(nan_for_null(json.loads(Path(path).read_text()))) + "\n")
        return
    overrides = parse_overrides(parser, args.set)
    names = {"both": ["synthetic", "digits"], "all": list(SETTINGS)}.get(args.dataset, [args.dataset])
    if len(names) > 1 and not args.merge and args.out and "{dataset}" not in args.out:
        parser.error(f"--dataset {args.dataset} writes one file per data set: put {{dataset}} in --out")
    seeds = args.seed_list if args.seed_list else list(range(min(args.seeds, 2) if args.quick else args.seeds))
    torch.set_num_threads(args.threads)  # after every check: a refused call changes nothing
    command = "python -m bench.bench_modes " + " ".join(sys.argv[1:] if argv is None else argv)
    print(command)
    if args.merge:
        name, setting, seeds, trained = merged_runs(args.merge)
        jobs = [(name, setting, trained)]
    else:
        jobs = [(name, dataclasses.replace(SETTINGS[name], **((QUICK | QUICK_SIZES.get(name, {}) if args.quick else {})
                                                                | overrides)), None) for name in names]
    for name, setting, trained in jobs:
        result = run_dataset(name, setting, seeds, args.modes, timing=not args.no_timing, trained=trained)
        result["command"] = command
        if not args.no_timing:
            print("\n" + table(result), flush=True)
        if args.out:
            path = Path(args.out.format(dataset=name))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(json_safe(result), indent=1) + "\n")
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
