"""The named steps: each is :func:`funcsam.sam_step` with one mode or source, nothing more.

    accumulated_sam_step(..., micro_batches, ...)       sam_step(..., source=MicroBatches())
    m_sharpness_sam_step(..., m=m)                      sam_step(..., source=MSharpness(m))
    scheduled_sam_step(..., step=t, schedule=s)         sam_step(..., mode=s, take_sam=s.takes_sam(t))
    looksam_step(..., take_sam=b, alpha=a)              sam_step(..., mode=LookSAM(alpha=a), take_sam=b)
    msam_step(...)                                      sam_step(..., mode=MSAM())
    gsam_step(..., alpha=a)                             sam_step(..., mode=GSAM(a))
    adaptive_sam_step(..., take_sam=b, threshold=c)     sam_step(..., mode=AESAM(threshold=c), take_sam=b)

Every other keyword is ``sam_step``'s (base, options or their keywords, loss_scale, ...), and so
are the semantics: each mode and source is documented in :mod:`funcsam.modes` and
:mod:`funcsam.sources`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .base import BaseOptimizer
from .engine import SAMStepOutput, resolve_base
from .modes import AESAM, GSAM, MSAM, LookSAM, check_mode
from .modes.aesam import AdaptiveState
from .modes.looksam import LookSAMState
from .modes.protocol import check_step
from .sources import MicroBatches, MSharpness
from .step import sam_step
from .tree import PyTree, Tensor

__all__ = ["accumulated_sam_step", "adaptive_sam_step", "gsam_step", "init_adaptive", "init_looksam",
           "looksam_step", "m_sharpness_sam_step", "msam_step", "scheduled_sam_step"]


def accumulated_sam_step(params: PyTree, buffers: PyTree, micro_batches: Sequence[Any], loss_fn: Callable,
                         rho: float | Tensor, lr: float | Tensor, momentum_state: Any, **kwargs) -> SAMStepOutput:
    """SAM with both gradients accumulated over ``micro_batches`` (:class:`funcsam.MicroBatches`)."""
    return sam_step(params, buffers, micro_batches, loss_fn, rho, lr, momentum_state, source=MicroBatches(), **kwargs)


def m_sharpness_sam_step(params: PyTree, buffers: PyTree, batch: Any, loss_fn: Callable, rho: float | Tensor,
                         lr: float | Tensor, momentum_state: Any, *, m: int, **kwargs) -> SAMStepOutput:
    """SAM whose perturbation is computed separately on each of ``m`` equal parts of ``batch``
    (:class:`funcsam.MSharpness`)."""
    return sam_step(params, buffers, batch, loss_fn, rho, lr, momentum_state, source=MSharpness(m), **kwargs)


def scheduled_sam_step(params: PyTree, buffers: PyTree, batch: Any, loss_fn: Callable, rho: float | Tensor,
                       lr: float | Tensor, momentum_state: Any, *, step: int, schedule: Any,
                       sam_step_fn: Callable[..., SAMStepOutput] = sam_step, **kwargs) -> SAMStepOutput:
    """``sam_step_fn`` with SAM on the steps ``schedule`` (``funcsam.every(k)``, ``funcsam.late(s)``)
    picks and the base step on the others. The choice is made here, on the host, so with
    ``sam_step_fn=torch.compile(funcsam.sam_step, fullgraph=True)`` the run keeps exactly two graphs."""
    if not hasattr(schedule, "takes_sam"):
        raise TypeError(f"schedule must be funcsam.every(k) or funcsam.late(start_step), got "
                        f"{type(schedule).__name__} {schedule!r:.60}")
    schedule = check_mode(schedule)
    check_step(step)
    return sam_step_fn(params, buffers, batch, loss_fn, rho, lr, momentum_state, mode=schedule,
                       take_sam=schedule.takes_sam(step, momentum_state), **kwargs)


def looksam_step(params: PyTree, buffers: PyTree, batch: Any, loss_fn: Callable, rho: float | Tensor,
                 lr: float | Tensor, momentum_state: LookSAMState, *, take_sam: bool, alpha: float = 0.7,
                 **kwargs) -> SAMStepOutput:
    """One LookSAM step (:class:`funcsam.LookSAM`): SAM and a new g_v if ``take_sam``, else the
    one-pass estimate. ``momentum_state`` is a :class:`funcsam.LookSAMState` (:func:`init_looksam`)."""
    return sam_step(params, buffers, batch, loss_fn, rho, lr, momentum_state, mode=LookSAM(alpha=alpha),
                    take_sam=take_sam, **kwargs)


def msam_step(params: PyTree, buffers: PyTree, batch: Any, loss_fn: Callable, rho: float | Tensor,
              lr: float | Tensor, momentum_state: Any, **kwargs) -> SAMStepOutput:
    """One Momentum-SAM step (:class:`funcsam.MSAM`): one pass at w - rho * m / (||m|| + eps)."""
    return sam_step(params, buffers, batch, loss_fn, rho, lr, momentum_state, mode=MSAM(), **kwargs)


def gsam_step(params: PyTree, buffers: PyTree, batch: Any, loss_fn: Callable, rho: float | Tensor,
              lr: float | Tensor, momentum_state: Any, *, alpha: float = 0.2, **kwargs) -> SAMStepOutput:
    """One GSAM step (:class:`funcsam.GSAM`): d = g_sam - alpha * g_orth."""
    return sam_step(params, buffers, batch, loss_fn, rho, lr, momentum_state, mode=GSAM(alpha), **kwargs)


def adaptive_sam_step(params: PyTree, buffers: PyTree, batch: Any, loss_fn: Callable, rho: float | Tensor,
                      lr: float | Tensor, momentum_state: AdaptiveState, *, take_sam: bool,
                      threshold: float | Tensor, delta: float = 0.9, **kwargs) -> SAMStepOutput:
    """One AE-SAM step (:class:`funcsam.AESAM`) with this step's threshold c_t given (e.g. from
    :func:`funcsam.linear_threshold`); follow the policy with ``take_sam=bool(state.take_next)``."""
    return sam_step(params, buffers, batch, loss_fn, rho, lr, momentum_state,
                    mode=AESAM(delta=delta, threshold=threshold), take_sam=take_sam, **kwargs)


def init_looksam(base: BaseOptimizer | None, params: PyTree) -> LookSAMState:
    """``LookSAM().init_state(base, params)``: the base's state and zero g_v (None is ``funcsam.sgd()``)."""
    return LookSAM().init_state(resolve_base(base), params)


def init_adaptive(base: BaseOptimizer | None, params: PyTree) -> AdaptiveState:
    """``AESAM(...).init_state(base, params)``: the base's state, empty statistics, take_next True."""
    return AESAM(total_steps=1).init_state(resolve_base(base), params)
