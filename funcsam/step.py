"""The pure SAM step: two gradient evaluations and an SGD update, over parameter pytrees.

Algorithm (Foret et al. 2020, Algorithm 1, with torch.optim.SGD as the base optimizer)::

    g      = grad L(w)                          (BatchNorm statistics of this pass are kept)
    e      = rho * g / (||g||_2 + eps)          (ASAM: rho * T^2 g / (||T g||_2 + eps), T = |w| + eta)
    g_sam  = grad L(w + e)                      (this pass's BatchNorm updates are discarded)
    w, buf = SGD(w, g_sam, buf; lr, momentum, dampening, weight_decay, nesterov)

Usage::

    params  = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state   = funcsam.init_momentum(params)
    out = funcsam.sam_step(params, buffers, (x, y), loss_fn, rho=0.05, lr=0.1, momentum_state=state,
                           momentum=0.9, weight_decay=5e-4)
    params, buffers, state = out.params, out.buffers, out.momentum_state
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import optree
import torch

from .clipping import clip_by_global_norm
from .hyperparameters import check_step_hyperparameters, is_static_zero
from .loss_scale import LossScaleState, update_loss_scale
from .perturbation import perturbation_and_norm
from .sgd import sgd_apply, sgd_direction
from .tree import PyTree, Tensor, flatten, global_norm, same_structure, select, traced_or_transformed, unflatten

GradReduce = Callable[[list], list]


class MomentumState(NamedTuple):
    """The SGD state carried between steps.

    Fields:
        momentum_buffer: a pytree shaped like ``params``; zeros before the first step.
        count: int64 0-dim tensor, the number of steps applied (skipped steps do not count).
    """

    momentum_buffer: PyTree
    count: Tensor


class SAMStepOutput(NamedTuple):
    """What :func:`sam_step` returns.

    Fields:
        params: the new parameters (the old ones if the step was skipped).
        buffers: the buffers after the unperturbed pass (the old ones if skipped).
        momentum_state: the new :class:`MomentumState`.
        loss: 0-dim fp32, the loss at w (unscaled), from the first pass.
        aux: the ``aux`` output of ``loss_fn`` at w (the logits for ``make_loss_fn``).
        finite: 0-dim bool; False means a gradient was non-finite and the step was skipped.
        grad_norm: 0-dim fp32, ||g|| of the first gradient (||T g|| for ASAM), after unscaling.
        loss_scale: the new :class:`LossScaleState`, or None when no loss scaling was asked for.
    """

    params: PyTree
    buffers: PyTree
    momentum_state: MomentumState
    loss: Tensor
    aux: Any
    finite: Tensor
    grad_norm: Tensor
    loss_scale: LossScaleState | None


def init_momentum(params: PyTree) -> MomentumState:
    """A fresh :class:`MomentumState` for ``params``: zero buffers and count 0."""
    leaves, spec = flatten(params)
    _check_params(leaves)
    device = leaves[0].device
    return MomentumState(
        momentum_buffer=unflatten(spec, [torch.zeros_like(leaf) for leaf in leaves]),
        count=torch.zeros((), dtype=torch.int64, device=device),
    )


def _check_params(leaves: Sequence) -> None:
    if not leaves:
        raise ValueError("params is empty: pass a non-empty pytree of tensors, e.g. dict(model.named_parameters())")
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            raise TypeError(f"every leaf of params must be a floating-point tensor, got {type(leaf).__name__}")


def _check_step_inputs(
    params: PyTree, loss_fn: Callable, momentum_state: MomentumState, sam_sync: str, **hyperparameters
) -> tuple[list[Tensor], Any, list[Tensor]]:
    """Validate a step's inputs; return ``(param_leaves, spec, momentum_buffer_leaves)``."""
    check_step_hyperparameters(**hyperparameters)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, buffers, batch), got {loss_fn!r}")
    if sam_sync not in ("global", "local"):
        raise ValueError(f"sam_sync must be 'global' or 'local', got {sam_sync!r}")
    if not isinstance(momentum_state, MomentumState):
        raise TypeError(
            f"momentum_state must be a funcsam.MomentumState (from funcsam.init_momentum(params)), "
            f"got {type(momentum_state).__name__}"
        )
    leaves, spec = flatten(params)
    _check_params(leaves)
    momentum_leaves, momentum_spec = flatten(momentum_state.momentum_buffer)
    if not same_structure(momentum_spec, spec):
        raise ValueError(
            "momentum_state.momentum_buffer does not have the structure of params; "
            "create it with funcsam.init_momentum(params)"
        )
    return leaves, spec, momentum_leaves


def _spread_non_finite(sam_grads: list, local_grad_norm: Tensor) -> list:
    """``sam_grads`` with NaN added where ``local_grad_norm`` is not finite (exactly unchanged otherwise).

    Under ``sam_sync="local"`` each replica's first gradient, and so its norm, is its own: a replica
    whose first gradient overflowed must skip the step on every replica, or they drift apart. Adding
    ``0 * norm`` (0, or NaN for an inf/NaN norm) to the SAM gradient before ``grad_reduce`` carries
    that verdict through the reduction that happens anyway, with no extra communication.
    """
    poison = 0.0 * local_grad_norm
    return [sam_grads[0] + poison.to(sam_grads[0].dtype)] + list(sam_grads[1:])


def _descend(
    leaves: list,
    spec,
    sam_grads: list,
    finite: Tensor,
    momentum_state: MomentumState,
    momentum_leaves: list,
    buffers: PyTree,
    new_buffers: PyTree,
    lr: float | Tensor,
    *,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    max_grad_norm: float | None,
) -> tuple[PyTree, PyTree, MomentumState]:
    """The descent half of every SAM step (plain, m-sharpness, accumulated), on flat leaf lists.

    Clips ``sam_grads`` to ``max_grad_norm`` if given, takes the SGD step, and keeps the old params,
    buffers and momentum state where ``finite`` (0-dim bool) is False.
    Returns ``(params, buffers, momentum_state)`` as pytrees.
    """
    if max_grad_norm is not None:
        sam_grads, _ = clip_by_global_norm(sam_grads, max_grad_norm)
    direction, stepped_momentum = sgd_direction(
        leaves, sam_grads, momentum_leaves,
        momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        first_step=momentum_state.count == 0,
    )
    stepped = sgd_apply(leaves, direction, lr)

    old_buffer_leaves, old_buffer_spec = flatten(buffers)
    new_buffer_leaves, new_buffer_spec = flatten(new_buffers)
    if not same_structure(new_buffer_spec, old_buffer_spec):
        raise ValueError("loss_fn returned new_buffers with a structure different from the buffers it was given")
    return (
        unflatten(spec, select(finite, stepped, leaves)),
        unflatten(old_buffer_spec, select(finite, new_buffer_leaves, old_buffer_leaves)),
        MomentumState(
            momentum_buffer=unflatten(spec, select(finite, stepped_momentum, momentum_leaves)),
            count=momentum_state.count + finite.to(momentum_state.count.dtype),
        ),
    )


def _gradient_fn(loss_fn: Callable, spec, loss_scale: LossScaleState | None):
    """``(leaves, buffers, batch) -> (grads, (loss, new_buffers, aux))`` with the loss scaled if asked.

    ``torch.func.grad`` lets only tensors out as auxiliary outputs, so ``aux`` travels flattened
    (None, an empty tuple and the like have no leaves) and is rebuilt outside.
    """
    aux_spec = {}
    # The scale enters the differentiated function as an argument, not through its closure: Dynamo
    # in torch 2.11 fails on a tensor closed over inside torch.func.grad.
    scale = None if loss_scale is None else loss_scale.scale

    def scaled_loss(leaves, buffers, batch, scale):
        loss, (new_buffers, aux) = loss_fn(unflatten(spec, leaves), buffers, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"loss_fn must return a 0-dim loss tensor first, got {type(loss).__name__} "
                             f"{tuple(getattr(loss, 'shape', ()))}")
        aux_leaves, aux_spec["spec"] = flatten(aux)
        scaled = loss if scale is None else loss * scale
        return scaled, (loss.detach(), new_buffers, aux_leaves)

    grad_fn = torch.func.grad(scaled_loss, has_aux=True)

    def gradient(leaves, buffers, batch):
        if traced_or_transformed():
            grads, (loss, new_buffers, aux_leaves) = grad_fn(leaves, buffers, batch, scale)
        else:
            grads, (loss, new_buffers, aux_leaves) = _eager_grad(scaled_loss, leaves, buffers, batch, scale)
        return grads, (loss, new_buffers, unflatten(aux_spec["spec"], aux_leaves))

    return gradient


def _eager_grad(scaled_loss: Callable, leaves: list, buffers, batch, scale):
    """What ``torch.func.grad(scaled_loss, has_aux=True)`` returns, by plain reverse-mode autograd.

    Outside any transform the two are the same computation, but ``torch.func.grad`` always records
    the backward for higher-order differentiation (``create_graph=True``) and routes every op
    through its wrapper layer, which costs about a third of a pass on a CPU ResNet-20. Inputs stay
    untouched: the leaves that require grad are fresh detached aliases.
    """
    with torch.enable_grad():
        differentiable = [leaf.detach().requires_grad_() for leaf in leaves]
        scaled, (loss, new_buffers, aux_leaves) = scaled_loss(differentiable, buffers, batch, scale)
        grads = torch.autograd.grad(scaled, differentiable, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    detach = lambda tree: optree.tree_map(torch.Tensor.detach, tree)  # noqa: E731
    return grads, (loss, detach(new_buffers), detach(aux_leaves))


def _unscale(grads: list, loss_scale: LossScaleState | None) -> list:
    if loss_scale is None:
        return grads
    return torch._foreach_div(grads, loss_scale.scale)


def _sam_gradient(
    grads: list,
    leaves: list,
    rho: float | Tensor,
    gradient_at: Callable[[list], list],
    *,
    adaptive: bool,
    eta: float,
    eps: float,
    loss_scale: LossScaleState | None,
    grad_reduce: GradReduce | None,
    sam_sync: str,
) -> tuple[list, Tensor, Tensor]:
    """From the (scaled, unreduced) first gradient to ``(g_sam, ||g||, finite)``.

    Reduces and unscales ``grads``, perturbs ``leaves`` by e, and takes the second gradient with
    ``gradient_at(w + e)`` (scaled, unreduced; one batch, or accumulated over micro-batches), which
    it reduces and unscales in turn. With the Python number ``rho == 0`` the first gradient is the
    one applied, so it is reduced under either sync and no second gradient is taken.
    """
    if grad_reduce is not None and (sam_sync == "global" or is_static_zero(rho)):
        grads = grad_reduce(grads)
    grads = _unscale(grads, loss_scale)
    if is_static_zero(rho):
        grad_norm = global_norm(grads)
        return grads, grad_norm, torch.isfinite(grad_norm)
    perturbation, grad_norm = perturbation_and_norm(grads, leaves, rho, adaptive=adaptive, eta=eta, eps=eps)
    sam_grads = gradient_at(torch._foreach_add(leaves, perturbation))
    if grad_reduce is not None:
        if sam_sync == "local":
            sam_grads = _spread_non_finite(sam_grads, grad_norm)
        sam_grads = grad_reduce(sam_grads)
    sam_grads = _unscale(sam_grads, loss_scale)
    return sam_grads, grad_norm, torch.isfinite(grad_norm) & torch.isfinite(global_norm(sam_grads))


def sam_step(
    params: PyTree,
    buffers: PyTree,
    batch: Any,
    loss_fn: Callable,
    rho: float | Tensor,
    lr: float | Tensor,
    momentum_state: MomentumState,
    *,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
    max_grad_norm: float | None = None,
    loss_scale: LossScaleState | None = None,
    grad_reduce: GradReduce | None = None,
    sam_sync: str = "global",
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
        momentum_state: from :func:`init_momentum` or a previous step.
        momentum, dampening, weight_decay, nesterov: torch.optim.SGD's, with its exact semantics;
            weight decay is added to the SAM gradient with the unperturbed weights.
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

    Returns:
        :class:`SAMStepOutput`. When a gradient (either pass) is non-finite, params, buffers and
        momentum state come back unchanged, ``finite`` is False and the loss scale backs off.
    """
    leaves, spec, momentum_leaves = _check_step_inputs(
        params, loss_fn, momentum_state, sam_sync, lr=lr, rho=rho, momentum=momentum, dampening=dampening,
        weight_decay=weight_decay, nesterov=nesterov, eta=eta, eps=eps, max_grad_norm=max_grad_norm,
    )

    gradient = _gradient_fn(loss_fn, spec, loss_scale)
    grads, (loss, new_buffers, aux) = gradient(leaves, buffers, batch)
    sam_grads, grad_norm, finite = _sam_gradient(
        grads, leaves, rho, lambda perturbed: gradient(perturbed, buffers, batch)[0],
        adaptive=adaptive, eta=eta, eps=eps, loss_scale=loss_scale, grad_reduce=grad_reduce, sam_sync=sam_sync,
    )
    new_params, kept_buffers, new_momentum_state = _descend(
        leaves, spec, sam_grads, finite, momentum_state, momentum_leaves, buffers, new_buffers, lr,
        momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        max_grad_norm=max_grad_norm,
    )
    return SAMStepOutput(
        params=new_params,
        buffers=kept_buffers,
        momentum_state=new_momentum_state,
        loss=loss,
        aux=aux,
        finite=finite,
        grad_norm=grad_norm,
        loss_scale=None if loss_scale is None else update_loss_scale(loss_scale, finite),
    )


