"""AE-SAM: the SAM step where the gradient norm says the loss is sharp, the base step elsewhere.

Jiang et al., "An Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR 2023, arXiv 2304.14647.
With n_t = ||g_t||^2, the squared norm of the first gradient g_t = grad L(w_t) (before any
perturbation; the plain norm, also under ASAM)::

    mu_t      = delta * mu_{t-1} + (1 - delta) * n_t                    running mean of ||g||^2
    sigma^2_t = delta * sigma^2_{t-1} + (1 - delta) * (n_t - mu_t)^2    running variance (with the new mean)
    sharp_t   = n_t >= mu_t + c_t * sigma_t                             c_t from linear_threshold(t, T)
    SAM (two passes) where sharp, the base step (one pass, rho = 0) elsewhere

The paper takes step t's decision from n_t itself. Here it lags by one step: step t's ``take_sam``
is ``sharp_{t-1}`` (with the c given to step t - 1), which step t - 1 left in the state as
``take_next``. The host reads that 0-dim bool before the step and passes
``take_sam=bool(state.take_next)``, so the data-dependent choice is a Python bool: a compiled run has
exactly two graphs (the SAM step and the base step), and a base step really runs one pass.
Reading the bool is free on the CPU. On a GPU it is a one-byte device-to-host copy that waits for
step t - 1 to finish: the host cannot queue step t while step t - 1 runs, so the GPU idles for the
host's time to launch step t (negligible next to a large model's step, visible for a tiny one;
CUDA graphs shorten it, they cannot remove it). The first step takes
SAM (``take_next`` starts True), and the first n_0 initialises the statistics: mu_0 = n_0,
sigma^2_0 = 0 (so sharp_0 holds and step 1 takes SAM too).

Usage (lr, rho and c_t as 0-dim tensors, so a compiled step never recompiles for new values)::

    base = funcsam.sgd(momentum=0.9, weight_decay=5e-4)
    state = funcsam.init_adaptive(base, params)
    step_fn = torch.compile(funcsam.adaptive_sam_step, fullgraph=True)     # or the function itself
    for t, batch in enumerate(batches):
        c_t = torch.tensor(funcsam.linear_threshold(t, total_steps))
        out = step_fn(params, buffers, batch, loss_fn, rho, lr, state,
                      take_sam=bool(state.take_next), threshold=c_t, base=base)
        params, buffers, state = out.params, out.buffers, out.momentum_state
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import torch

from .base import BaseOptimizer
from .engine import (
    GradReduce, SAMOptions, SAMStepOutput, check_batch, finish_step, gradient_fn, one_pass_gradient, prepare_step,
    resolve_base, sam_gradient,
)
from .hyperparameters import check_scalar
from .loss_scale import LossScaleState
from .tree import PyTree, Tensor, flatten, global_norm, select

__all__ = ["AdaptiveState", "adaptive_sam_step", "adaptive_statistics", "init_adaptive", "linear_threshold"]


class AdaptiveState(NamedTuple):
    """The state of :func:`adaptive_sam_step` (its ``momentum_state`` argument and output).

    Fields:
        base_state: the base optimizer's state (``MomentumState`` or ``AdamState``), as ``sam_step``'s.
        mean: fp32 0-dim, mu: the running mean of ||g||^2 (0 before the first step).
        var: fp32 0-dim, sigma^2: the running variance of ||g||^2 (0 before the first step).
        take_next: bool 0-dim, the rule on the last step's ||g||^2: whether the next step should take
            SAM. True before the first step. Read it on the host: ``take_sam=bool(state.take_next)``.
        count: int64 0-dim, how many gradient norms the statistics hold (skipped steps add none).
    """

    base_state: Any
    mean: Tensor
    var: Tensor
    take_next: Tensor
    count: Tensor


def init_adaptive(base: BaseOptimizer | None, params: PyTree) -> AdaptiveState:
    """A fresh :class:`AdaptiveState`: ``base.init(params)`` (``base=None`` is ``funcsam.sgd()``), empty
    statistics, and ``take_next`` True (the first step takes SAM), on the parameters' device."""
    base_state = resolve_base(base).init(params)
    device = flatten(params)[0][0].device
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return AdaptiveState(base_state, zero, zero.clone(), torch.ones((), dtype=torch.bool, device=device),
                         torch.zeros((), dtype=torch.int64, device=device))


def linear_threshold(step: int, total_steps: int, start: float = 1.0, end: float = -1.0) -> float:
    """c_t, moving linearly from ``start`` at step 0 to ``end`` at ``total_steps`` (host-side)::

        c_t = start + (end - start) * t / T       the paper's c_t = (t / T) lambda_1 + (1 - t / T) lambda_2

    The defaults are lambda_2 = 1 and lambda_1 = -1: a high bar early (about 16% of steps take SAM if
    ||g||^2 were normal) falling to a low one late (about 84%), half of the steps over a run.

    Args:
        step: the 0-based step t, an int in [0, total_steps].
        total_steps: T, the number of steps of the run, an int >= 1.
        start, end: finite real numbers, c_0 and c_T.
    """
    check_int("total_steps", total_steps, minimum=1)
    check_int("step", step, minimum=0)
    if step > total_steps:
        raise ValueError(f"step must be <= total_steps ({total_steps}), got {step}")
    for name, value in (("start", start), ("end", end)):
        if not is_finite_number(value):
            raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(start + (end - start) * step / total_steps)


def adaptive_sam_step(
    params: PyTree,
    buffers: PyTree,
    batch: Any,
    loss_fn: Callable,
    rho: float | Tensor,
    lr: float | Tensor,
    momentum_state: AdaptiveState,
    *,
    take_sam: bool,
    threshold: float | Tensor,
    delta: float = 0.9,
    base: BaseOptimizer | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
    max_grad_norm: float | None = None,
    loss_scale: LossScaleState | None = None,
    grad_reduce: GradReduce | None = None,
) -> SAMStepOutput:
    """One AE-SAM step (module docstring): ``sam_step``'s SAM step if ``take_sam``, else the base
    step in one pass; then the statistics take this step's ||g||^2 and decide the next step.

    Args:
        momentum_state: an :class:`AdaptiveState` from :func:`init_adaptive` or a previous step.
        take_sam: a Python bool, ``bool(momentum_state.take_next)`` to follow the policy (any other
            bool is obeyed, e.g. to force SAM). Each value is its own graph under torch.compile.
        threshold: c_t, a finite real number or a 0-dim floating tensor (no recompiles as it
            changes), e.g. from :func:`linear_threshold`. It decides the *next* step.
        delta: the statistics' decay, in [0, 1) (the paper's 0.9).
        The other arguments are ``sam_step``'s (with ``sam_sync="global"``); rho is unused on base
        steps, and ``base=None`` is ``funcsam.sgd()``. With ``grad_reduce`` the norm is that of the
        reduced gradient, so every replica holds the same statistics and makes the same choice.

    Returns:
        :class:`funcsam.SAMStepOutput` whose ``momentum_state`` is the new :class:`AdaptiveState`.
        ``grad_norm`` is ||g|| (||T g|| on ASAM's SAM steps, as ``sam_step``'s). A skipped
        (non-finite) step keeps the statistics and ``take_next`` with the rest of the state.
    """
    if not isinstance(take_sam, bool):
        raise TypeError(f"take_sam must be a Python bool read on the host, bool(state.take_next); "
                        f"got {type(take_sam).__name__} {take_sam!r}")
    check_delta(delta)
    _check_threshold(threshold)
    if not isinstance(momentum_state, AdaptiveState):
        raise TypeError(f"momentum_state must be a funcsam.AdaptiveState from funcsam.init_adaptive(base, params), "
                        f"got {type(momentum_state).__name__}")
    setup = prepare_step(params, loss_fn, rho, lr, momentum_state.base_state, resolve_base(base),
                         SAMOptions(adaptive, eta, eps, max_grad_norm, loss_scale, grad_reduce))
    check_batch(batch)
    gradient = gradient_fn(loss_fn, setup)
    grads, (loss, new_buffers, aux) = gradient(setup.leaves, buffers, batch)
    if take_sam:
        sam = sam_gradient(setup, grads, lambda perturbed: gradient(perturbed, buffers, batch)[0])
    else:
        sam = one_pass_gradient(setup, grads)
    out = finish_step(setup, sam, buffers, new_buffers, loss, aux)
    # The engine's grad_norm is ||T g|| under ASAM; the policy watches the plain ||g||.
    grad_norm = global_norm(sam.first_grads) if adaptive else sam.grad_norm
    state = _observe(momentum_state, grad_norm, threshold, delta, out.finite)
    return SAMStepOutput(out.params, out.buffers, state._replace(base_state=out.momentum_state), out.loss, out.aux,
                         out.finite, out.grad_norm, out.loss_scale)


def _observe(state: AdaptiveState, grad_norm: Tensor, threshold: float | Tensor, delta: float,
             finite: Tensor) -> AdaptiveState:
    """The statistics with n = grad_norm^2 folded in, and the rule on n; the old ones where not ``finite``."""
    mean, var, count, take_next = adaptive_statistics(state.mean, state.var, state.count, state.take_next,
                                                      grad_norm.square(), threshold=threshold, delta=delta,
                                                      finite=finite)
    return AdaptiveState(state.base_state, mean, var, take_next, count)


def adaptive_statistics(mean: Tensor, var: Tensor, count: Tensor, take_next: Tensor, squared_norm: Tensor, *,
                        threshold: float | Tensor, delta: float,
                        finite: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """AE-SAM's rule on one step's n = ||g||^2: ``(mean, var, count, take_next)`` after it.

    The one rule of :func:`adaptive_sam_step` and of ``funcsam.SAM``/``SAMSGD`` with
    ``mode=funcsam.AESAM(...)``::

        mu        = n                                  on the first n (count == 0): mu = n, sigma^2 = 0
        mu        = delta * mu + (1 - delta) * n        otherwise
        sigma^2   = delta * sigma^2 + (1 - delta) * (n - mu)^2
        take_next = n >= mu + threshold * sigma

    Pure tensor code (no host sync, traceable by torch.compile). Where ``finite`` (a 0-dim bool
    tensor, the step's verdict) is False, the four inputs come back unchanged (``torch.where``).

    Args:
        mean, var: fp32 0-dim, the running mean and variance of ||g||^2 (0 while count is 0).
        count: int64 0-dim, how many n the statistics hold. take_next: bool 0-dim, the last decision.
        squared_norm: 0-dim, n = ||g||^2 of the plain first gradient at w (reduced and unscaled),
            cast to ``mean``'s dtype.
        threshold: c_t, a finite real number or a 0-dim floating tensor (:func:`linear_threshold`).
        delta: the statistics' decay, in [0, 1).
        finite: whether the step was taken; None is True.
    """
    check_delta(delta)
    _check_threshold(threshold)
    n = squared_norm.to(mean.dtype)
    first = count == 0
    new_mean = torch.where(first, n, delta * mean + (1 - delta) * n)
    new_var = torch.where(first, torch.zeros_like(var), delta * var + (1 - delta) * (n - new_mean).square())
    new_take_next = n >= new_mean + threshold * new_var.sqrt()
    if finite is None:
        return new_mean, new_var, count + 1, new_take_next
    new_mean, new_var, new_take_next = select(finite, [new_mean, new_var, new_take_next], [mean, var, take_next])
    return new_mean, new_var, count + finite.to(count.dtype), new_take_next


def is_finite_number(value: Any) -> bool:
    """A real Python number that is neither inf nor NaN (value - value is 0 exactly for those)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value - value == 0


def check_int(name: str, value: Any, *, minimum: int) -> None:
    """``value`` must be a Python int >= ``minimum``; TypeError or ValueError naming ``name``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def check_delta(delta: Any) -> None:
    """AE-SAM's decay of its running statistics: a real in [0, 1)."""
    if not (isinstance(delta, numbers.Real) and not isinstance(delta, bool)):
        raise TypeError(f"delta must be a Python number in [0, 1) (the statistics' decay, 0.9 in the paper), "
                        f"got {type(delta).__name__} {delta!r}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1) (the statistics' decay, 0.9 in the paper), got {delta}")


def _check_threshold(threshold: Any) -> None:
    """c_t: any finite real, a Python number or a 0-dim floating tensor (a GPU value is not read)."""
    check_scalar("threshold (c_t)", threshold, allow_tensor=True, minimum=-math.inf)
