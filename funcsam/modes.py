"""Cheaper SAM modes as pure steps on the one engine: schedules, LookSAM, MSAM, and GSAM.

With g = grad L(w), e = rho * g / (||g|| + eps) and g_sam = grad L(w + e) as in ``sam_step``::

    schedules  every(k), late(start)   SAM on the steps the schedule picks, the base step (rho = 0) on the others
    LookSAM    SAM step:    g_v = g_sam - (g . g_sam / (||g||^2 + eps)) g              (stored)
               other steps: g_sam ~ g + alpha * ||g|| * g_v / (||g_v|| + eps)          (one pass)
    MSAM       e = -rho * m / (||m|| + eps), m the base's momentum;  g = grad L(w + e) (one pass)
    GSAM       g_orth = g - (g . g_sam / (||g_sam||^2 + eps)) g_sam;  d = g_sam - alpha * g_orth
    then       w, s = base.update(w, d, s; lr)    (d = the mode's gradient; clipping and skipping as in sam_step)

Usage (a host-side Python schedule picks the graph; lr and rho are 0-dim tensors under torch.compile)::

    base, schedule = funcsam.sgd(momentum=0.9), funcsam.every(5)
    state = funcsam.init_looksam(base, params)
    for step, batch in enumerate(batches):
        out = funcsam.looksam_step(params, buffers, batch, loss_fn, rho, lr, state,
                                   take_sam=schedule.takes_sam(step), base=base)
        params, buffers, state = out.params, out.buffers, out.momentum_state

Dot products and norms are global (one scalar over every leaf) and computed in fp32 (fp64 if a leaf
is fp64). A Python ``if`` only ever branches on Python values (``take_sam``, ``alpha == 0``, the
schedule), so a compiled step has one graph per branch and never recompiles for new lr or rho.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from .base import SGD, BaseOptimizer
from .engine import (
    GradReduce, SAMGradient, SAMOptions, SAMStepOutput, StepSetup, check_batch, finish_step, gradient_fn,
    one_pass_gradient, perturb, prepare_step, resolve_base, sam_gradient,
)
from .hyperparameters import check_scalar
from .loss_scale import LossScaleState
from .step import sam_step
from .tree import PyTree, Tensor, dot, flatten, same_structure, select, unflatten

__all__ = [
    "Every", "Late", "LookSAMState", "every", "gsam_direction", "gsam_step", "init_looksam", "late", "looksam_estimate",
    "looksam_step", "msam_step", "orthogonal_part", "scheduled_sam_step",
]


# ---------------------------------------------------------------------------------------------------
# Schedules: which steps take the SAM gradient (host-side, a Python decision per step)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Every:
    """SAM on steps 0, k, 2k, ... and the base step on the others (the ``interval`` of MosaicML
    Composer's SAM); ``Every(1)`` is SAM on every step. Build it with :func:`every`."""

    k: int

    def __post_init__(self):
        _check_int("k", self.k, minimum=1, meaning="SAM runs on steps 0, k, 2k, ...; k=1 is SAM on every step")

    def takes_sam(self, step: int) -> bool:
        """Whether step ``step`` (0-based) takes the SAM gradient."""
        _check_step(step)
        return step % self.k == 0


@dataclass(frozen=True)
class Late:
    """The base step before ``start_step``, SAM from it on: late-phase SAM (Zhou et al. 2024,
    "Sharpness-Aware Minimization Efficiently Selects Flatter Minima Late in Training",
    arXiv 2410.10373); ``Late(0)`` is SAM on every step. Build it with :func:`late`."""

    start_step: int

    def __post_init__(self):
        _check_int("start_step", self.start_step, minimum=0, meaning="the first (0-based) step that takes SAM")

    def takes_sam(self, step: int) -> bool:
        """Whether step ``step`` (0-based) takes the SAM gradient."""
        _check_step(step)
        return step >= self.start_step


def every(k: int) -> Every:
    """SAM every ``k`` steps (steps 0, k, 2k, ...), the base step between: a SAM step costs two
    passes, so the average cost is (1 + 1/k) passes per step. ``k`` is an int >= 1."""
    return Every(k)


def late(start_step: int) -> Late:
    """The base step on steps 0 .. start_step - 1, SAM from ``start_step`` on (arXiv 2410.10373).
    ``start_step`` is an int >= 0."""
    return Late(start_step)


def scheduled_sam_step(
    params: PyTree,
    buffers: PyTree,
    batch: Any,
    loss_fn: Callable,
    rho: float | Tensor,
    lr: float | Tensor,
    momentum_state: Any,
    *,
    step: int,
    schedule: Every | Late,
    base: BaseOptimizer | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
    max_grad_norm: float | None = None,
    loss_scale: LossScaleState | None = None,
    grad_reduce: GradReduce | None = None,
    sam_sync: str = "global",
    sam_step_fn: Callable[..., SAMStepOutput] = sam_step,
) -> SAMStepOutput:
    """``sam_step`` with ``rho`` on the steps ``schedule`` picks, with the Python number 0 (the base
    step, one pass) on the others.

    The choice is made here, in Python, so with
    ``sam_step_fn=torch.compile(funcsam.sam_step, fullgraph=True)`` the run keeps exactly two graphs
    (the SAM step and the base step), whatever lr and rho (0-dim tensors) do. Compiling this function itself would guard on ``step``.

    Args:
        step: the 0-based index of this step, a Python int.
        schedule: :func:`every` or :func:`late` (any object with ``takes_sam(step: int) -> bool``).
        sam_step_fn: the step to call, :func:`funcsam.sam_step` or a compiled one (above).
        The other arguments are ``sam_step``'s; ``base=None`` is ``funcsam.sgd()``.

    Returns:
        ``sam_step_fn``'s :class:`funcsam.SAMStepOutput`; on base steps ``grad_norm`` is ||g||.
    """
    takes = _takes_sam(schedule, step)
    return sam_step_fn(params, buffers, batch, loss_fn, rho if takes else 0, lr, momentum_state, base=base,
                       adaptive=adaptive, eta=eta, eps=eps, max_grad_norm=max_grad_norm, loss_scale=loss_scale,
                       grad_reduce=grad_reduce, sam_sync=sam_sync)


# ---------------------------------------------------------------------------------------------------
# LookSAM: the SAM gradient's extra direction, measured every few steps and reused in between
# ---------------------------------------------------------------------------------------------------


class LookSAMState(NamedTuple):
    """The state of :func:`looksam_step` (its ``momentum_state`` argument and output).

    Fields:
        base_state: the base optimizer's state (``MomentumState`` or ``AdamState``), as ``sam_step``'s.
        g_v: a pytree shaped like ``params``: the part of the last SAM step's g_sam orthogonal to its
            g (zeros before the first SAM step, which makes a cheap step the base step).
    """

    base_state: Any
    g_v: PyTree


def init_looksam(base: BaseOptimizer | None, params: PyTree) -> LookSAMState:
    """A fresh :class:`LookSAMState`: ``base.init(params)`` and zero ``g_v`` (``base=None`` is ``funcsam.sgd()``)."""
    base_state = resolve_base(base).init(params)
    leaves, spec = flatten(params)
    return LookSAMState(base_state, unflatten(spec, [torch.zeros_like(leaf) for leaf in leaves]))


def looksam_step(
    params: PyTree,
    buffers: PyTree,
    batch: Any,
    loss_fn: Callable,
    rho: float | Tensor,
    lr: float | Tensor,
    momentum_state: LookSAMState,
    *,
    take_sam: bool,
    alpha: float = 0.7,
    base: BaseOptimizer | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
    max_grad_norm: float | None = None,
    loss_scale: LossScaleState | None = None,
    grad_reduce: GradReduce | None = None,
) -> SAMStepOutput:
    """One LookSAM step (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization",
    CVPR 2022, arXiv 2203.02714, Algorithm 1)::

        take_sam:   g_sam = grad L(w + e)  (sam_step's two passes),  g_v = g_sam - (g . g_sam / (||g||^2 + eps)) g
        otherwise:  g_sam ~ g + alpha * ||g|| * g_v / (||g_v|| + eps)                     (one pass, g_v kept)
        then        w, s = base.update(w, g_sam, s; lr)

    Args:
        momentum_state: a :class:`LookSAMState` from :func:`init_looksam` or a previous step.
        take_sam: a Python bool from a host-side schedule, e.g. ``funcsam.every(5).takes_sam(step)``
            (the paper's k = 5). Each value is its own graph under torch.compile.
        alpha: the weight >= 0 of the reused direction (the paper's alpha; 0.7 by default).
        The other arguments are ``sam_step``'s (with ``sam_sync="global"``); rho is unused on the
        cheap steps, and ``base=None`` is ``funcsam.sgd()``.

    Returns:
        :class:`funcsam.SAMStepOutput` whose ``momentum_state`` is the new :class:`LookSAMState`
        (holding the base optimizer's state). ``grad_norm`` is ||g|| (||T g|| on ASAM's SAM steps).
        A skipped (non-finite) step keeps ``g_v`` with the rest of the state.
    """
    if not isinstance(take_sam, bool):
        raise TypeError(f"take_sam must be a Python bool from a host-side schedule, e.g. "
                        f"funcsam.every(5).takes_sam(step); got {type(take_sam).__name__} {take_sam!r}")
    _check_alpha(alpha)
    if not isinstance(momentum_state, LookSAMState):
        raise TypeError(f"momentum_state must be a funcsam.LookSAMState from funcsam.init_looksam(base, params), "
                        f"got {type(momentum_state).__name__}")
    setup = prepare_step(params, loss_fn, rho, lr, momentum_state.base_state, resolve_base(base),
                         SAMOptions(adaptive, eta, eps, max_grad_norm, loss_scale, grad_reduce))
    check_batch(batch)
    g_v = _flatten_like_params(momentum_state.g_v, "momentum_state.g_v", setup)
    gradient = gradient_fn(loss_fn, setup)
    grads, (loss, new_buffers, aux) = gradient(setup.leaves, buffers, batch)
    if take_sam:
        sam = sam_gradient(setup, grads, lambda perturbed: gradient(perturbed, buffers, batch)[0])
        new_g_v = orthogonal_part(sam.grads, sam.first_grads, eps)
    else:
        sam = one_pass_gradient(setup, grads)
        sam = SAMGradient(looksam_estimate(sam.grads, sam.grad_norm, g_v, alpha, eps), sam.grad_norm,
                          sam.finite, sam.first_grads)
        new_g_v = g_v
    out = finish_step(setup, sam, buffers, new_buffers, loss, aux)
    state = LookSAMState(out.momentum_state, unflatten(setup.spec, select(out.finite, new_g_v, g_v)))
    return SAMStepOutput(out.params, out.buffers, state, out.loss, out.aux, out.finite, out.grad_norm, out.loss_scale)


def looksam_estimate(grads: list, grad_norm: Tensor, g_v: list, alpha: float, eps: float) -> list:
    """LookSAM's one-pass estimate of g_sam, g + alpha * ||g|| * g_v / (||g_v|| + eps) (``grad_norm`` is
    ||g||). ``g_v`` is scaled to unit norm first, so a zero ``g_v`` gives exactly ``g`` and no
    coefficient can overflow."""
    unit = torch._foreach_mul(g_v, 1.0 / (dot(g_v, g_v).sqrt() + eps))
    return torch._foreach_add(grads, torch._foreach_mul(unit, alpha * grad_norm))


# ---------------------------------------------------------------------------------------------------
# MSAM: perturb along the momentum the base optimizer already holds, one pass
# ---------------------------------------------------------------------------------------------------


def msam_step(
    params: PyTree,
    buffers: PyTree,
    batch: Any,
    loss_fn: Callable,
    rho: float | Tensor,
    lr: float | Tensor,
    momentum_state: Any,
    *,
    base: BaseOptimizer | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
    max_grad_norm: float | None = None,
    loss_scale: LossScaleState | None = None,
    grad_reduce: GradReduce | None = None,
) -> SAMStepOutput:
    """One Momentum-SAM step (Becker et al., "Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead", 2024, arXiv 2401.12033)::

        m      = the base's momentum: momentum_buffer (SGD) or exp_avg (Adam, AdamW), before this step
        e      = -rho * m / (||m|| + eps)            (ASAM: -rho * T^2 m / (||T m|| + eps), T = |w| + eta)
        g      = grad L(w + e)                       the step's one pass
        w, s   = base.update(w, g, s; lr)            at w, not at w + e

    With m = 0 (the first step) e = 0 and the step is exactly the base step.

    Args:
        base: ``funcsam.sgd(momentum > 0, ...)``, ``funcsam.adam(...)`` or ``funcsam.adamw(...)``. An SGD
            base without momentum (and so ``base=None``, plain ``funcsam.sgd()``) is refused: it has no
            momentum to perturb along.
        The other arguments are ``sam_step``'s (with ``sam_sync="global"``).

    Returns:
        :class:`funcsam.SAMStepOutput` with ``momentum_state`` the base optimizer's state. There is
        no pass at w: ``loss``, ``aux``, ``buffers`` (BatchNorm statistics) and ``grad_norm`` (||g||)
        all come from the pass at w + e.
    """
    base = resolve_base(base)
    if isinstance(base, SGD) and base.momentum == 0:
        raise ValueError("msam_step perturbs along the base optimizer's momentum, and an SGD base with momentum=0 "
                         "has none: pass base=funcsam.sgd(momentum=0.9, ...) or funcsam.adamw(...)")
    setup = prepare_step(params, loss_fn, rho, lr, momentum_state, base,
                         SAMOptions(adaptive, eta, eps, max_grad_norm, loss_scale, grad_reduce))
    check_batch(batch)
    momentum = setup.state.momentum_buffer if isinstance(base, SGD) else setup.state.exp_avg
    ascent, _ = perturb(setup, momentum)
    grads, (loss, new_buffers, aux) = gradient_fn(loss_fn, setup)(
        torch._foreach_sub(setup.leaves, ascent), buffers, batch)
    sam = one_pass_gradient(setup, grads)
    return finish_step(setup, sam, buffers, new_buffers, loss, aux)


# ---------------------------------------------------------------------------------------------------
# GSAM: SAM's gradient minus a little of g's part orthogonal to it, no extra pass
# ---------------------------------------------------------------------------------------------------


def gsam_step(
    params: PyTree,
    buffers: PyTree,
    batch: Any,
    loss_fn: Callable,
    rho: float | Tensor,
    lr: float | Tensor,
    momentum_state: Any,
    *,
    alpha: float = 0.2,
    base: BaseOptimizer | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
    max_grad_norm: float | None = None,
    loss_scale: LossScaleState | None = None,
    grad_reduce: GradReduce | None = None,
) -> SAMStepOutput:
    """One GSAM step (Zhuang et al., "Surrogate Gap Minimization Improves Sharpness-Aware Training",
    ICLR 2022, arXiv 2203.08065, Algorithm 1)::

        g, g_sam  as in sam_step (two passes)
        g_orth  = g - (g . g_sam / (||g_sam||^2 + eps)) g_sam       g's part orthogonal to g_sam
        d       = g_sam - alpha * g_orth                            descends the perturbed loss, ascends the gap
        w, s    = base.update(w, d, s; lr)

    ``alpha = 0`` is exactly ``sam_step``. The paper also moves rho with lr (rho_t proportional to
    lr_t); pass such a rho each step (a 0-dim tensor does not recompile).

    Args:
        alpha: the weight >= 0 of the ascent on the surrogate gap. The paper tunes it per task and
            gives no single default; 0.2 is the authors' PyTorch CIFAR-10 example (their ViT-B/32
            ImageNet configuration in big_vision uses 0.6).
        The other arguments are ``sam_step``'s (with ``sam_sync="global"``); ``base=None`` is ``funcsam.sgd()``.

    Returns:
        :class:`funcsam.SAMStepOutput`, as ``sam_step``'s (loss, aux and buffers from the pass at w).
    """
    _check_alpha(alpha)
    setup = prepare_step(params, loss_fn, rho, lr, momentum_state, resolve_base(base),
                         SAMOptions(adaptive, eta, eps, max_grad_norm, loss_scale, grad_reduce))
    check_batch(batch)
    gradient = gradient_fn(loss_fn, setup)
    grads, (loss, new_buffers, aux) = gradient(setup.leaves, buffers, batch)
    sam = sam_gradient(setup, grads, lambda perturbed: gradient(perturbed, buffers, batch)[0])
    if alpha != 0:  # a Python constant: alpha = 0 leaves sam_step's gradient untouched, bit for bit
        sam = SAMGradient(gsam_direction(sam.first_grads, sam.grads, alpha, eps), sam.grad_norm, sam.finite,
                          sam.first_grads)
    return finish_step(setup, sam, buffers, new_buffers, loss, aux)


# ---------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------


def gsam_direction(first_grads: list[Tensor], sam_grads: list[Tensor], alpha: float, eps: float) -> list[Tensor]:
    """GSAM's update direction d = g_sam - alpha * g_orth, g_orth = g - (g . g_sam / (||g_sam||^2 + eps)) g_sam."""
    return torch._foreach_sub(sam_grads, torch._foreach_mul(orthogonal_part(first_grads, sam_grads, eps), alpha))


def orthogonal_part(x: list[Tensor], y: list[Tensor], eps: float) -> list[Tensor]:
    """``x - (x . y / (||y||^2 + eps)) y``: the part of ``x`` orthogonal to ``y`` (global dot products
    over aligned flat leaf lists, in fp32). It is bounded by ``||x||``, so it stays finite."""
    coefficient = dot(x, y) / (dot(y, y) + eps)
    return torch._foreach_sub(x, torch._foreach_mul(y, coefficient))


def _flatten_like_params(tree: PyTree, name: str, setup: StepSetup) -> list[Tensor]:
    """The leaves of a per-parameter state field, checked against the parameters, detached."""
    leaves, spec = flatten(tree)
    if not same_structure(spec, setup.spec) or len(leaves) != len(setup.leaves) or any(
        leaf.shape != param.shape or leaf.dtype != param.dtype for leaf, param in zip(leaves, setup.leaves)
    ):
        raise ValueError(f"{name} does not have the structure, shapes and dtypes of params: create the state "
                         "with funcsam.init_looksam(base, params)")
    return [leaf.detach() for leaf in leaves]


def _check_alpha(alpha: float) -> None:
    check_scalar("alpha", alpha)  # a real Python number, finite and >= 0


def _check_int(name: str, value: Any, *, minimum: int, meaning: str) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int ({meaning}), got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} ({meaning}), got {value}")


def _check_step(step: Any) -> None:
    _check_int("step", step, minimum=0, meaning="the 0-based index of the training step, a Python int")


def _takes_sam(schedule: Any, step: int) -> bool:
    takes_sam = getattr(schedule, "takes_sam", None)
    if not callable(takes_sam):
        raise TypeError(f"schedule must be funcsam.every(k) or funcsam.late(start_step) (an object with "
                        f"takes_sam(step) -> bool), got {type(schedule).__name__} {schedule!r}")
    _check_step(step)
    takes = takes_sam(step)
    if not isinstance(takes, bool):
        raise TypeError(f"schedule.takes_sam(step) must return a Python bool, got {type(takes).__name__}")
    return takes
