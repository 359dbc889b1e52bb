"""AE-SAM: the SAM step where the gradient norm says the loss is sharp, the base step elsewhere.

Jiang et al., "An Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR 2023, arXiv 2304.14647.
With n_t = ||g_t||^2, the squared norm of the first gradient g_t = grad L(w_t) (the plain norm, also
under ASAM; reduced across replicas, so every replica decides alike)::

    mu_t      = delta * mu_{t-1} + (1 - delta) * n_t                    running mean of ||g||^2
    sigma^2_t = delta * sigma^2_{t-1} + (1 - delta) * (n_t - mu_t)^2    running variance (with the new mean)
    sharp_t   = n_t >= mu_t + c_t * sigma_t                             c_t = start + (end - start) * min(t, T) / T
    SAM (two passes) where sharp, the base step (one pass) elsewhere

The paper takes step t's decision from n_t itself. Here it lags by one step: step t takes SAM if
``sharp_{t-1}``, which step t - 1 left in the state as ``take_next``. The host reads that 0-dim bool
before the step (``mode.takes_sam(step, state)``), so the data-dependent choice is a Python bool: a
compiled run has exactly two graphs, and a base step really runs one pass. Reading it is free on
the CPU; on a GPU it is a one-byte copy that waits for step t - 1 to finish, so the GPU idles while
the host launches step t (negligible next to a large model's step, visible for a tiny one). The
first step takes SAM (``take_next`` starts True), and the first n_0 initialises the statistics:
mu_0 = n_0, sigma^2_0 = 0 (so step 1 takes SAM too). A skipped (non-finite) step keeps the
statistics and ``take_next``; its index t still moves on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..hyperparameters import check_int, check_scalar, is_finite_number
from ..tree import Tensor, select
from .protocol import Mode, StepGradients

__all__ = ["AESAM", "AdaptiveState", "AdaptiveStatistics", "adaptive_statistics", "check_delta", "linear_threshold"]


class AdaptiveState(NamedTuple):
    """The pure step's state under ``mode=AESAM(...)``.

    Fields:
        base_state: the base optimizer's state (``MomentumState`` or ``AdamState``).
        mean: fp32 0-dim, mu: the running mean of ||g||^2 (0 before the first step).
        var: fp32 0-dim, sigma^2: the running variance of ||g||^2 (0 before the first step).
        take_next: bool 0-dim, whether the next step takes SAM (True before the first step).
        count: int64 0-dim, how many gradient norms the statistics hold (skipped steps add none).
        step: int64 0-dim, the steps taken (skipped ones too): the t of the threshold c_t.
    """

    base_state: Any
    mean: Tensor
    var: Tensor
    take_next: Tensor
    count: Tensor
    step: Tensor


class AdaptiveStatistics(NamedTuple):
    """AE-SAM's own state (the fields of :class:`AdaptiveState` after ``base_state``)."""

    mean: Tensor
    var: Tensor
    take_next: Tensor
    count: Tensor
    step: Tensor


ADAPTIVE_DTYPES = AdaptiveStatistics(torch.float32, torch.float32, torch.bool, torch.int64, torch.int64)


@dataclass(frozen=True)
class AESAM(Mode):
    """AE-SAM (module docstring).

    Fields:
        total_steps: T, an int >= 1: c_t moves linearly from ``start`` to ``end`` over T steps and
            stays at ``end`` after. Required unless ``threshold`` is given.
        delta: the statistics' decay, in [0, 1) (the paper's 0.9).
        start: c_0, a finite real (1: a high bar early).
        end: c_T, a finite real (-1: a low bar late; from 1 to -1 about half of a run's steps take SAM).
        threshold: a fixed c_t instead of the schedule, a finite real or a 0-dim floating tensor
            (a tensor does not recompile a compiled step as it changes); None: the schedule.
    """

    total_steps: int | None = None
    delta: float = 0.9
    start: float = 1.0
    end: float = -1.0
    threshold: float | Tensor | None = None

    uses_first_gradient = True
    two_halves = False
    state_type = AdaptiveState
    own_type = AdaptiveStatistics
    checkpoint_key = "adaptive"
    example = "funcsam.AESAM(total_steps=10000)"

    def __post_init__(self):
        if self.threshold is None:
            check_int("total_steps", self.total_steps, minimum=1,
                      meaning="the steps over which the threshold c_t moves from start to end")
        else:
            check_scalar("threshold (c_t)", self.threshold, allow_tensor=True, minimum=-math.inf)
        check_delta(self.delta)
        for name in ("start", "end"):
            if not is_finite_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite real number, got {getattr(self, name)!r}")

    def takes_sam(self, step: int, state: Any = None) -> bool:
        """``bool(state.take_next)``: the rule the last step evaluated on the device (one host read)."""
        take_next = getattr(state, "take_next", None)
        if not isinstance(take_next, torch.Tensor):
            raise TypeError("AESAM decides from its state: pass the step's state (an AdaptiveState from "
                            f"mode.init_state(base, params), or the optimizer's), got {type(state).__name__}")
        return bool(take_next)

    def init(self, params: list) -> AdaptiveStatistics:
        device = params[0].device
        return AdaptiveStatistics(*(torch.tensor(True if dtype == torch.bool else 0, dtype=dtype, device=device)
                                    for dtype in ADAPTIVE_DTYPES))

    def own_state_problem(self, own: AdaptiveStatistics) -> str | None:
        if not (bool(own.mean.isfinite()) and bool(own.var.isfinite()) and float(own.var) >= 0):
            return "mean and var must be finite, var >= 0"
        if int(own.count) < 0 or int(own.step) < 0:
            return "count and step must be >= 0"
        return None

    def threshold_at(self, step: Tensor) -> Tensor | float:
        """c_t for the 0-dim int ``step`` (computed in fp64, as :func:`linear_threshold` on the host)."""
        if self.threshold is not None:
            return self.threshold
        t = step.clamp(max=self.total_steps).to(torch.float64)
        return self.start + (self.end - self.start) * t / self.total_steps

    def observe(self, before: AdaptiveStatistics, after: AdaptiveStatistics, gradients: StepGradients,
                finite: Tensor) -> AdaptiveStatistics:
        threshold = self.threshold_at(before.step)
        mean, var, count, take_next = adaptive_statistics(
            before.mean, before.var, before.count, before.take_next, self.first_norm(gradients).square(),
            threshold=threshold, delta=self.delta, finite=finite)
        return AdaptiveStatistics(mean, var, take_next, count, before.step + 1)


def linear_threshold(step: int, total_steps: int, start: float = 1.0, end: float = -1.0) -> float:
    """c_t, moving linearly from ``start`` at step 0 to ``end`` at ``total_steps`` (host-side)::

        c_t = start + (end - start) * t / T       the paper's c_t = (t / T) lambda_1 + (1 - t / T) lambda_2

    Args:
        step: the 0-based step t, an int in [0, total_steps].
        total_steps: T, the number of steps of the run, an int >= 1.
        start: c_0, a finite real number.
        end: c_T, a finite real number.
    """
    check_int("total_steps", total_steps, minimum=1)
    check_int("step", step, minimum=0)
    if step > total_steps:
        raise ValueError(f"step must be <= total_steps ({total_steps}), got {step}")
    for name, value in (("start", start), ("end", end)):
        if not is_finite_number(value):
            raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(start + (end - start) * step / total_steps)


def adaptive_statistics(mean: Tensor, var: Tensor, count: Tensor, take_next: Tensor, squared_norm: Tensor, *,
                        threshold: float | Tensor, delta: float,
                        finite: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """AE-SAM's rule on one step's n = ||g||^2: ``(mean, var, count, take_next)`` after it::

        mu        = n                                  on the first n (count == 0): mu = n, sigma^2 = 0
        mu        = delta * mu + (1 - delta) * n        otherwise
        sigma^2   = delta * sigma^2 + (1 - delta) * (n - mu)^2
        take_next = n >= mu + threshold * sigma

    Pure tensor code (no host sync). Where ``finite`` (0-dim bool, the step's verdict) is False, the
    four inputs come back unchanged; None is True.
    """
    n = squared_norm.to(mean.dtype)
    first = count == 0
    new_mean = torch.where(first, n, delta * mean + (1 - delta) * n)
    new_var = torch.where(first, torch.zeros_like(var), delta * var + (1 - delta) * (n - new_mean).square())
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(mean.dtype)
    new_take_next = n >= new_mean + threshold * new_var.sqrt()
    if finite is None:
        return new_mean, new_var, count + 1, new_take_next
    new_mean, new_var, new_take_next = select(finite, [new_mean, new_var, new_take_next], [mean, var, take_next])
    return new_mean, new_var, count + finite.to(count.dtype), new_take_next


def check_delta(delta: Any) -> None:
    """AE-SAM's decay of its running statistics: a real in [0, 1)."""
    check_scalar("delta", delta, minimum=-math.inf)  # the type; the range is said once, below
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1) (the statistics' decay, 0.9 in the paper), got {delta}")
