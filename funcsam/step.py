"""The pure SAM step: two gradient evaluations and a base optimizer's update, over parameter pytrees.

Algorithm (Foret et al. 2020, Algorithm 1, with any base optimizer; torch.optim.SGD by default)::

    g      = grad L(w)                          (BatchNorm statistics of this pass are kept)
    e      = rho * g / (||g||_2 + eps)          (ASAM: rho * T^2 g / (||T g||_2 + eps), T = |w| + eta)
    g_sam  = grad L(w + e)                      (this pass's BatchNorm updates are discarded)
    w, s   = base.update(w, g_sam, s; lr)       (SGD with momentum, Adam, AdamW: funcsam.sgd/adam/adamw)

Usage::

    params  = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    base    = funcsam.sgd(momentum=0.9, weight_decay=5e-4)          # or funcsam.adamw(weight_decay=0.05)
    state   = base.init(params)
    out = funcsam.sam_step(params, buffers, (x, y), loss_fn, rho=0.05, lr=0.1, momentum_state=state, base=base)
    params, buffers, state = out.params, out.buffers, out.momentum_state

Every mode and gradient source runs through this one step::

    mode  = funcsam.LookSAM(k=5, alpha=0.7)                          # or every(k), late(s), MSAM(), GSAM(a), AESAM(T)
    state = mode.init_state(base, params)                            # the base's state, with the mode's own
    for t, batch in enumerate(batches):
        out = funcsam.sam_step(params, buffers, batch, loss_fn, rho, lr, state, base=base, mode=mode,
                               take_sam=mode.takes_sam(t, state),    # host side: one graph per branch
                               source=funcsam.MicroBatches())        # or MSharpness(m); batch is then a list
        params, buffers, state = out.params, out.buffers, out.momentum_state

The SGD keywords (``momentum=0.9, weight_decay=5e-4``, with ``funcsam.init_momentum(params)``) are
a shorthand for ``base=funcsam.sgd(...)``, and the option keywords (``adaptive=True``,
``max_grad_norm=1.0``, ...) one for ``options=funcsam.SAMOptions(...)``.
"""

from __future__ import annotations

from typing import Any, Callable

from .base import BaseOptimizer, MomentumState, sgd
from .engine import SAMStepOutput, prepare_step, resolve_base, resolve_options, run_pipeline
from .loss_scale import LossScaleState
from .modes.protocol import Mode, check_mode
from .options import GradReduce, SAMOptions
from .sources import check_source
from .tree import PyTree, Tensor

__all__ = ["MomentumState", "SAMStepOutput", "init_momentum", "sam_step"]


def init_momentum(params: PyTree) -> MomentumState:
    """A fresh :class:`MomentumState` for ``params`` (zero buffers, count 0): ``funcsam.sgd().init(params)``."""
    return sgd().init(params)


def sam_step(
    params: PyTree,
    buffers: PyTree,
    batch: Any,
    loss_fn: Callable,
    rho: float | Tensor,
    lr: float | Tensor,
    momentum_state: Any,
    *,
    base: BaseOptimizer | None = None,
    mode: Mode | None = None,
    take_sam: bool = True,
    source: Any = None,
    options: SAMOptions | None = None,
    loss_scale: LossScaleState | None = None,
    momentum: float | None = None,
    dampening: float | None = None,
    weight_decay: float | None = None,
    nesterov: bool | None = None,
    adaptive: bool | None = None,
    eta: float | None = None,
    eps: float | None = None,
    max_grad_norm: float | None = None,
    grad_reduce: GradReduce | None = None,
    sam_sync: str | None = None,
    perturb_mask: PyTree | None = None,
) -> SAMStepOutput:
    """One SAM step. Pure: returns new params, buffers and state; mutates nothing it was given.

    Args:
        params: pytree of floating tensors (e.g. a dict from ``named_parameters()``, detached).
        buffers: pytree passed to ``loss_fn`` unchanged (e.g. BatchNorm running statistics).
        batch: anything ``loss_fn`` takes, e.g. ``(inputs, targets)``; with
            ``source=funcsam.MicroBatches()`` a list of such batches.
        loss_fn: ``loss_fn(params, buffers, batch) -> (loss, (new_buffers, aux))`` with a 0-dim loss;
            :func:`funcsam.make_loss_fn` builds one from a module.
        rho: neighbourhood radius >= 0, a float or a 0-dim tensor (tensors do not recompile when
            they change under torch.compile). The Python number 0 gives the base step in one pass.
        lr: learning rate >= 0, a float or a 0-dim tensor.
        momentum_state: the step's state, from ``mode.init_state(base, params)`` (``base.init(params)``
            for modes without state of their own; :func:`init_momentum` for the SGD shorthand) or a
            previous step.
        base: the base optimizer that applies the SAM gradient: ``funcsam.sgd(...)``, ``funcsam.adam(...)``,
            ``funcsam.adamw(...)``. Default: SGD built from the shorthand keywords below.
        mode: how the step spends its second pass (:mod:`funcsam.modes`): None (SAM), ``funcsam.every(k)``,
            ``funcsam.late(s)``, ``funcsam.LookSAM(k, alpha)``, ``funcsam.MSAM()``, ``funcsam.GSAM(alpha)``,
            ``funcsam.AESAM(total_steps)``.
        take_sam: a Python bool: whether this step takes the SAM gradient (True) or the mode's
            one-pass step (the base step; LookSAM's estimate). Follow the mode with
            ``take_sam=mode.takes_sam(step, state)``, decided on the host so that a compiled step has
            one graph per value. MSAM's one pass at w + e counts as its SAM step.
        source: where the gradients come from (:mod:`funcsam.sources`): None (the batch),
            ``funcsam.MicroBatches()`` (accumulation over a list of micro-batches) or
            ``funcsam.MSharpness(m)`` (each of m parts perturbs with its own gradient).
        options: a :class:`funcsam.SAMOptions` (ASAM, eps, clipping, data parallelism, SAM-ON); or
            its fields as the keywords ``adaptive, eta, eps, max_grad_norm, grad_reduce, sam_sync,
            perturb_mask`` (not both).
        loss_scale: a :class:`LossScaleState` for fp16 dynamic loss scaling (state, carried from
            step to step): both passes are scaled, the gradients unscaled, an overflow skips the
            step and backs the scale off.
        momentum: with ``dampening``, ``weight_decay`` and ``nesterov``, a shorthand for
            ``base=funcsam.sgd(...)`` (each defaults to 0 / False), torch.optim.SGD's with its exact
            semantics. Passing any of the four with ``base`` is an error.
        dampening: SGD's dampening of the momentum (shorthand, see ``momentum``).
        weight_decay: SGD's L2 penalty, added to the SAM gradient with the unperturbed weights
            (shorthand, see ``momentum``).
        nesterov: SGD's Nesterov momentum (shorthand, see ``momentum``).

    Returns:
        :class:`SAMStepOutput`. When the loss or a gradient (either pass) is non-finite, params,
        buffers and the state come back unchanged, ``finite`` is False and the loss scale backs off.
        Params that require grad are detached: the step records no autograd graph.
    """
    if not isinstance(take_sam, bool):
        raise TypeError(f"take_sam must be a Python bool decided on the host, e.g. take_sam=mode.takes_sam(step, "
                        f"state); got {type(take_sam).__name__} {take_sam!r:.40}")
    mode, source = check_mode(mode), check_source(source)
    base = resolve_base(base, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    options = resolve_options(options, adaptive=adaptive, eta=eta, eps=eps, max_grad_norm=max_grad_norm,
                              grad_reduce=grad_reduce, sam_sync=sam_sync, perturb_mask=perturb_mask)
    mode.check_momentum(base.has_momentum, "the SGD base with momentum=0")
    setup = prepare_step(params, loss_fn, rho, lr, mode.base_state_of(momentum_state), base, options, loss_scale)
    own = mode.own_state_of(momentum_state, setup.spec, setup.leaves)
    source.check(batch)
    out, own = run_pipeline(setup, mode, source, own, loss_fn, buffers, batch, take_sam)
    # Built field by field: torch 2.11 compiles NamedTuple._replace into a malformed tuple.
    return SAMStepOutput(out.params, out.buffers, mode.join_state(out.momentum_state, own, setup.spec), out.loss,
                         out.aux, out.finite, out.grad_norm, out.loss_scale)
