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

The SGD keywords (``momentum=0.9, weight_decay=5e-4``, with ``funcsam.init_momentum(params)``) are
a shorthand for ``base=funcsam.sgd(...)``.
"""

from __future__ import annotations

from typing import Any, Callable

from .base import BaseOptimizer, MomentumState, sgd
from .engine import (
    GradReduce, SAMOptions, SAMStepOutput, check_batch, finish_step, gradient_fn, prepare_step, resolve_base,
    sam_gradient,
)
from .loss_scale import LossScaleState
from .sam_on import perturb_mask_leaves
from .tree import PyTree, Tensor

__all__ = ["GradReduce", "MomentumState", "SAMStepOutput", "init_momentum", "sam_step"]


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
    momentum: float | None = None,
    dampening: float | None = None,
    weight_decay: float | None = None,
    nesterov: bool | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
    max_grad_norm: float | None = None,
    loss_scale: LossScaleState | None = None,
    grad_reduce: GradReduce | None = None,
    sam_sync: str = "global",
    perturb_mask: PyTree | None = None,
) -> SAMStepOutput:
    """One SAM step. Pure: returns new params, buffers and state; mutates nothing it was given.

    Args:
        params: pytree of floating tensors (e.g. a dict from ``named_parameters()``, detached).
        buffers: pytree passed to ``loss_fn`` unchanged (e.g. BatchNorm running statistics).
        batch: anything ``loss_fn`` takes, e.g. ``(inputs, targets)``.
        loss_fn: ``loss_fn(params, buffers, batch) -> (loss, (new_buffers, aux))`` with a 0-dim loss;
            :func:`funcsam.make_loss_fn` builds one from a module.
        rho: neighbourhood radius >= 0, a float or a 0-dim tensor (tensors do not recompile when
            they change under torch.compile). The Python number 0 gives plain SGD in one pass.
        lr: learning rate >= 0, a float or a 0-dim tensor.
        momentum_state: the base optimizer's state, from ``base.init(params)`` (:func:`init_momentum`
            for the SGD shorthand) or a previous step.
        base: the base optimizer that applies the SAM gradient: ``funcsam.sgd(...)``, ``funcsam.adam(...)``,
            ``funcsam.adamw(...)``. Default: SGD built from the shorthand keywords below.
        momentum, dampening, weight_decay, nesterov: shorthand for ``base=funcsam.sgd(...)`` (each
            defaults to 0 / False), torch.optim.SGD's with its exact semantics; weight decay is added
            to the SAM gradient with the unperturbed weights. Passing any of them with ``base`` is an error.
        adaptive: ASAM's scale-invariant perturbation, ``T = |w| + eta``.
        eps: added to the gradient norm; a zero gradient gives e = 0.
        max_grad_norm: if given, the SAM gradient is clipped to this global norm before the update.
        loss_scale: a :class:`LossScaleState` for fp16 dynamic loss scaling: both passes are scaled,
            the gradients unscaled, an overflow skips the step and backs the scale off.
        grad_reduce: a function on the flat gradient list (e.g. an all-reduce mean across data-parallel
            replicas, :func:`funcsam.distributed.all_reduce_mean`). Called on the SAM gradient, and on
            the first gradient too when ``sam_sync == "global"``.
        sam_sync: ``"global"`` (the perturbation from the averaged gradient; identical to one process
            on the whole batch) or ``"local"`` (each replica perturbs with its own gradient:
            m-sharpness with m = the per-replica batch; a non-finite first gradient on any replica
            skips the step on all of them). Only matters with ``grad_reduce``.
        perturb_mask: SAM-ON (:mod:`funcsam.sam_on`): a pytree of Python bools shaped like ``params``
            (``funcsam.sam_on.norm_layer_mask(model)``). Only the True leaves are perturbed, by
            e_N = rho * g_N / (||g_N|| + eps), and ``grad_norm`` is ||g_N||; every leaf descends with
            g_sam. None (default) perturbs every leaf.

    Returns:
        :class:`SAMStepOutput`. When the loss or a gradient (either pass) is non-finite, params,
        buffers and the base optimizer's state come back unchanged, ``finite`` is False and the loss
        scale backs off. Params that require grad are detached: the step records no autograd graph.
    """
    setup = prepare_step(
        params, loss_fn, rho, lr, momentum_state,
        resolve_base(base, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov),
        SAMOptions(adaptive, eta, eps, max_grad_norm, loss_scale, grad_reduce, sam_sync,
                   perturb_mask_leaves(perturb_mask, params)),
    )
    check_batch(batch)
    gradient = gradient_fn(loss_fn, setup)
    grads, (loss, new_buffers, aux) = gradient(setup.leaves, buffers, batch)
    sam = sam_gradient(setup, grads, lambda perturbed: gradient(perturbed, buffers, batch)[0])
    return finish_step(setup, sam, buffers, new_buffers, loss, aux)
