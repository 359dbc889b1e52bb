"""The one SAM engine behind every pure step: plain, accumulated, m-sharpness, data-parallel.

The steps differ only in how they obtain the two gradients; the rest is written once here::

    setup = prepare_step(params, loss_fn, rho, lr, state, base, options)     validate, flatten once
    g, (loss, new_buffers, aux) = <first gradient at w>                      one batch, micro-batches, parts
    sam = sam_gradient(setup, g, gradient_at)                                reduce, unscale, perturb, g(w + e)
    out = finish_step(setup, sam, buffers, new_buffers, loss, aux)           clip, base update, skip if non-finite

``gradient_fn`` builds the differentiated loss (with loss scaling); the m-sharpness step perturbs each
part itself with :func:`perturb` and joins at :func:`finish_step`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optree
import torch

from .base import BaseOptimizer, check_base, check_params, flatten_state, select_state, sgd, unflatten_state
from .clipping import clip_by_global_norm
from .hyperparameters import check_sam_hyperparameters, is_static_zero
from .loss_scale import LossScaleState, update_loss_scale
from .perturbation import perturbation_and_norm
from .tree import PyTree, Tensor, flatten, global_norm, same_structure, select, traced_or_transformed, unflatten

GradReduce = Callable[[list], list]


class SAMStepOutput(NamedTuple):
    """What every pure SAM step returns.

    Fields:
        params: the new parameters (the old ones if the step was skipped).
        buffers: the buffers after the unperturbed pass (the old ones if skipped).
        momentum_state: the base optimizer's new state (``MomentumState`` for SGD, ``AdamState`` for Adam(W)).
        loss: 0-dim fp32, the loss at w (unscaled), from the first pass.
        aux: the ``aux`` output of ``loss_fn`` at w (the logits for ``make_loss_fn``).
        finite: 0-dim bool; False means the loss or a gradient was non-finite and the step was skipped.
        grad_norm: 0-dim fp32, ||g|| of the first gradient (||T g|| for ASAM), after unscaling.
        loss_scale: the new :class:`LossScaleState`, or None when no loss scaling was asked for.
    """

    params: PyTree
    buffers: PyTree
    momentum_state: Any
    loss: Tensor
    aux: Any
    finite: Tensor
    grad_norm: Tensor
    loss_scale: LossScaleState | None


class SAMOptions(NamedTuple):
    """The SAM-side options every step takes (the base optimizer's hyperparameters live in ``base``)."""

    adaptive: bool = False
    eta: float = 0.0
    eps: float = 1e-12
    max_grad_norm: float | None = None
    loss_scale: LossScaleState | None = None
    grad_reduce: GradReduce | None = None
    sam_sync: str = "global"
    # SAM-ON (funcsam.sam_on): one Python bool per parameter leaf, in optree order; False leaves are
    # not perturbed and stay out of the norm. None perturbs every leaf.
    perturb_mask: tuple[bool, ...] | None = None


class StepSetup(NamedTuple):
    """A step's validated inputs, flattened once: what the engine's parts share."""

    leaves: list  # the parameters, detached, in optree order
    spec: Any  # the treespec that rebuilds params (and every per-parameter state field)
    state: Any  # the base optimizer's state with its per-parameter fields flattened
    base: BaseOptimizer
    rho: float | Tensor
    lr: float | Tensor
    options: SAMOptions


class SAMGradient(NamedTuple):
    """The gradient the base optimizer applies, and the verdict on the step."""

    grads: list  # g_sam (or g when rho is the number 0), reduced and unscaled
    grad_norm: Tensor  # ||g|| (||T g|| for ASAM)
    finite: Tensor  # 0-dim bool: every gradient involved was finite
    first_grads: list | None = None  # g, reduced and unscaled (the same list as grads when rho is the number 0)


def resolve_base(base: BaseOptimizer | None, **sgd_shorthand) -> BaseOptimizer:
    """``base``, or ``funcsam.sgd(...)`` built from the SGD keywords a step was given (None = not given)."""
    given = {name: value for name, value in sgd_shorthand.items() if value is not None}
    if base is None:
        return sgd(**given)
    if given:
        raise ValueError(
            f"{', '.join(sorted(given))} given together with base=: the base optimizer carries its own "
            f"hyperparameters; pass them to it, e.g. base=funcsam.sgd({', '.join(f'{k}={v}' for k, v in given.items())})"
        )
    check_base(base)
    return base


def prepare_step(params: PyTree, loss_fn: Callable, rho, lr, momentum_state, base: BaseOptimizer,
                 options: SAMOptions) -> StepSetup:
    """Validate a step's inputs (raising with the argument's name and the fix) and flatten them once."""
    check_sam_hyperparameters(lr=lr, rho=rho, eta=options.eta, eps=options.eps, max_grad_norm=options.max_grad_norm)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, buffers, batch), got {loss_fn!r}")
    if options.sam_sync not in ("global", "local"):
        raise ValueError(f"sam_sync must be 'global' or 'local', got {options.sam_sync!r}")
    if options.loss_scale is not None and not isinstance(options.loss_scale, LossScaleState):
        raise TypeError(f"loss_scale must be a funcsam.LossScaleState (from funcsam.init_loss_scale()) or None, "
                        f"got {type(options.loss_scale).__name__} {options.loss_scale!r}")
    if options.grad_reduce is not None and not callable(options.grad_reduce):
        raise TypeError(f"grad_reduce must be a function list[Tensor] -> list[Tensor] or None, got {options.grad_reduce!r}")
    check_params(params)
    leaves, spec = flatten(params)
    # Detached: parameters straight from named_parameters() would otherwise chain every step's
    # update into one autograd graph that lives as long as the parameters do.
    leaves = [leaf.detach() for leaf in leaves]
    state = flatten_state(base, momentum_state, params, spec, leaves)
    return StepSetup(leaves, spec, state, base, rho, lr, options)


def check_batch(batch: Any, what: str = "batch") -> None:
    """An empty batch would give a NaN mean loss with zero gradients: refuse it by name."""
    for leaf in flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == 0:
            raise ValueError(f"{what} is empty (a tensor of shape {tuple(leaf.shape)}): every step needs at least one example")


def gradient_fn(loss_fn: Callable, setup: StepSetup):
    """``(leaves, buffers, batch) -> (grads, (loss, new_buffers, aux))``, the loss scaled if asked.

    ``torch.func.grad`` lets only tensors out as auxiliary outputs, so ``aux`` travels flattened
    (None, an empty tuple and the like have no leaves) and is rebuilt outside.
    """
    aux_spec = {}
    spec = setup.spec
    # The scale enters the differentiated function as an argument, not through its closure: Dynamo
    # in torch 2.11 fails on a tensor closed over inside torch.func.grad.
    scale = None if setup.options.loss_scale is None else setup.options.loss_scale.scale

    def scaled_loss(leaves, buffers, batch, scale):
        loss, new_buffers, aux = unpack_loss_fn_output(loss_fn(unflatten(spec, leaves), buffers, batch))
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


def unpack_loss_fn_output(output: Any) -> tuple[Tensor, Any, Any]:
    """``(loss, new_buffers, aux)`` from what a ``loss_fn`` returned; TypeError, with the expected form, otherwise."""
    if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], tuple) and len(output[1]) == 2):
        got = f"a tuple of {len(output)}" if isinstance(output, tuple) else type(output).__name__
        raise TypeError(
            f"loss_fn must return (loss, (new_buffers, aux)), got {got}. funcsam.make_loss_fn(model, criterion) "
            "builds one; a function f(params, batch) that returns only the loss fits as "
            "lambda params, buffers, batch: (f(params, batch), (buffers, None))"
        )
    loss, (new_buffers, aux) = output
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        got = f"a {loss.dtype} tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(f"loss_fn must return a 0-dim floating-point loss tensor first, got {got} "
                        "(reduce it with .mean(), and do not convert it with .item() or int())")
    return loss, new_buffers, aux


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
        if not scaled.requires_grad:
            raise ValueError(
                "loss_fn's loss does not depend on the params it was given: compute it from them (with "
                "torch.func.functional_call, as funcsam.make_loss_fn does), not from the module's own "
                "parameters, and do not detach it"
            )
        grads = torch.autograd.grad(scaled, differentiable, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    detach = lambda tree: optree.tree_map(torch.Tensor.detach, tree)  # noqa: E731
    return grads, (loss, detach(new_buffers), detach(aux_leaves))


def unscale(grads: list, loss_scale: LossScaleState | None) -> list:
    """``grads / scale`` (the gradients of the true loss), or ``grads`` without loss scaling."""
    if loss_scale is None:
        return grads
    return torch._foreach_div(grads, loss_scale.scale)


def reduce_gradients(grad_reduce: GradReduce, grads: list) -> list:
    """``grad_reduce(grads)``, checked to return one tensor of the same shape per gradient."""
    reduced = list(grad_reduce(grads))
    if len(reduced) != len(grads) or any(
        not isinstance(r, torch.Tensor) or r.shape != g.shape for r, g in zip(reduced, grads)
    ):
        raise ValueError(
            f"grad_reduce must return one tensor per gradient, each of the gradient's shape ({len(grads)} "
            f"tensors); it returned {len(reduced)}: {[tuple(getattr(r, 'shape', ())) for r in reduced][:4]}..."
        )
    return reduced


def spread_non_finite(sam_grads: list, local_grad_norm: Tensor) -> list:
    """``sam_grads`` with NaN added where ``local_grad_norm`` is not finite (exactly unchanged otherwise).

    Under ``sam_sync="local"`` each replica's first gradient, and so its norm, is its own: a replica
    whose first gradient overflowed must skip the step on every replica, or they drift apart. Adding
    ``0 * norm`` (0, or NaN for an inf/NaN norm) to the SAM gradient before ``grad_reduce`` carries
    that verdict through the reduction that happens anyway, with no extra communication.
    """
    poison = 0.0 * local_grad_norm
    return [sam_grads[0] + poison.to(sam_grads[0].dtype)] + list(sam_grads[1:])


def perturb(setup: StepSetup, grads: list) -> tuple[list, Tensor]:
    """``(e, ||g||)`` for the (reduced, unscaled) gradient ``grads`` at the step's parameters.

    With ``options.perturb_mask`` (SAM-ON) only the leaves marked True are perturbed and normed:
    e_N = rho * g_N / (||g_N|| + eps) (ASAM: T^2 g_N / ||T g_N||), e = 0 on the other leaves, and the
    returned norm is ||g_N||. The mask is a tuple of Python bools, so each mask is its own graph.
    """
    options = setup.options
    mask = options.perturb_mask
    if mask is not None and (len(mask) != len(grads) or not any(mask)):
        raise ValueError(f"perturb_mask must hold one bool per parameter leaf ({len(grads)}), at least one True; "
                         f"got {len(mask)} entries, {sum(map(bool, mask))} True")
    if mask is None or all(mask):
        return perturbation_and_norm(grads, setup.leaves, setup.rho, adaptive=options.adaptive, eta=options.eta,
                                     eps=options.eps)
    kept = [index for index, perturbed in enumerate(mask) if perturbed]
    kept_e, norm = perturbation_and_norm([grads[i] for i in kept], [setup.leaves[i] for i in kept], setup.rho,
                                         adaptive=options.adaptive, eta=options.eta, eps=options.eps)
    perturbation = [torch.zeros_like(grad) for grad in grads]
    for index, e in zip(kept, kept_e):
        perturbation[index] = e
    return perturbation, norm


def one_pass_gradient(setup: StepSetup, grads: list) -> SAMGradient:
    """The (scaled, unreduced) gradient of a step's single pass, reduced and unscaled, with its norm
    and verdict: what the base step (rho = 0), MSAM and LookSAM's cheap steps apply or build on."""
    if setup.options.grad_reduce is not None:
        grads = reduce_gradients(setup.options.grad_reduce, grads)
    grads = unscale(grads, setup.options.loss_scale)
    grad_norm = global_norm(grads)
    return SAMGradient(grads, grad_norm, torch.isfinite(grad_norm), grads)


def sam_gradient(setup: StepSetup, grads: list, gradient_at: Callable[[list], list]) -> SAMGradient:
    """From the (scaled, unreduced) first gradient to the SAM gradient.

    Reduces and unscales ``grads``, perturbs the parameters by e, and takes the second gradient with
    ``gradient_at(w + e)`` (scaled, unreduced; one batch, or accumulated over micro-batches), which
    it reduces and unscales in turn. With the Python number ``rho == 0`` the first gradient is the
    one applied, so it is reduced under either sync and no second gradient is taken.
    """
    if is_static_zero(setup.rho):
        return one_pass_gradient(setup, grads)
    options = setup.options
    reduce, loss_scale = options.grad_reduce, options.loss_scale
    if reduce is not None and options.sam_sync == "global":
        grads = reduce_gradients(reduce, grads)
    grads = unscale(grads, loss_scale)
    perturbation, grad_norm = perturb(setup, grads)
    sam_grads = gradient_at(torch._foreach_add(setup.leaves, perturbation))
    if reduce is not None:
        if options.sam_sync == "local":
            sam_grads = spread_non_finite(sam_grads, grad_norm)
        sam_grads = reduce_gradients(reduce, sam_grads)
    sam_grads = unscale(sam_grads, loss_scale)
    return SAMGradient(sam_grads, grad_norm, torch.isfinite(grad_norm) & torch.isfinite(global_norm(sam_grads)), grads)


def finish_step(setup: StepSetup, sam: SAMGradient, buffers: PyTree, new_buffers: PyTree, loss: Tensor,
                aux: Any) -> SAMStepOutput:
    """The descent half of every SAM step: clip, base update, and keep the old params, buffers and
    state (``finite`` False, the loss scale backing off) when the loss or a gradient was non-finite."""
    finite = sam.finite & torch.isfinite(loss)
    grads = sam.grads
    if setup.options.max_grad_norm is not None:
        grads, _ = clip_by_global_norm(grads, setup.options.max_grad_norm)
    stepped, stepped_state = setup.base.update(setup.leaves, grads, setup.state, setup.lr)

    old_buffer_leaves, buffer_spec = flatten(buffers)
    new_buffer_leaves, new_buffer_spec = flatten(new_buffers)
    if not same_structure(new_buffer_spec, buffer_spec):
        raise ValueError("loss_fn returned new_buffers with a structure different from the buffers it was given")
    loss_scale = setup.options.loss_scale
    return SAMStepOutput(
        params=unflatten(setup.spec, select(finite, stepped, setup.leaves)),
        buffers=unflatten(buffer_spec, select(finite, new_buffer_leaves, old_buffer_leaves)),
        momentum_state=unflatten_state(setup.spec, select_state(finite, stepped_state, setup.state)),
        loss=loss,
        aux=aux,
        finite=finite,
        grad_norm=sam.grad_norm,
        loss_scale=None if loss_scale is None else update_loss_scale(loss_scale, finite),
    )
