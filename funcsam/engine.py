"""The one SAM pipeline behind every pure step: any mode, any gradient source, any base optimizer.

Written once, here; the mode (:mod:`funcsam.modes`) and the source (:mod:`funcsam.sources`) are
the two plugs, and the optimizers call the same mode hooks::

    setup  = prepare_step(params, loss_fn, rho, lr, base_state, base, options, loss_scale)
    rho    = rho * mode.rho_scale                                        (every(k, scale_rho=True): rho * k)
    point  = w, or w - rho * m / ||m|| where the mode ascends along the momentum (MSAM)
    first  = source.first_pass(gradient, point, buffers, batch)          units g_k, loss, buffers, aux
    SAM step:   g_k reduced (sam_sync global) and unscaled, e_k = perturb(g_k),
                g_sam = source.second_pass(gradient, w, e_k, ...), reduced and unscaled; g is not kept
    base step:  g = mean_k g_k, reduced and unscaled
    d, s   = mode.direction(gradients, s);  s = mode.observe(...)
    out    = finish_step(setup, d, finite, ...)                          clip, base update, skip if non-finite

Every norm and dot product over the parameter tree goes through :mod:`funcsam.tree`'s reductions.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optree
import torch

from .base import BaseOptimizer, check_base, check_params, flatten_state, select_state, sgd, unflatten_state
from .clipping import clip_by_global_norm
from .hyperparameters import check_scalar, is_static_zero
from .loss_scale import LossScaleState, update_loss_scale
from .modes.protocol import Mode, StepGradients
from .options import GradReduce, SAMOptions, check_options
from .perturbation import perturbation_and_norm
from .sam_on import perturb_mask_leaves
from .tree import (PyTree, Tensor, flatten, global_norm, mean_of, picker, same_structure, traced_or_transformed,
                   unflatten)

__all__ = ["SAMStepOutput", "StepSetup", "prepare_step", "run_pipeline"]


class SAMStepOutput(NamedTuple):
    """What every pure SAM step returns.

    Fields:
        params: the new parameters (the old ones if the step was skipped).
        buffers: the buffers after the first pass (the old ones if skipped).
        momentum_state: the step's new state: the base optimizer's (``MomentumState``, ``AdamState``),
            wrapped with the mode's own where it has one (``LookSAMState``, ``AdaptiveState``).
        loss: 0-dim fp32, the loss of the first pass (unscaled): at w, or at MSAM's one point.
        aux: the ``aux`` output of ``loss_fn`` from the first pass (the logits for ``make_loss_fn``).
        finite: 0-dim bool; False means the loss or a gradient was non-finite and the step was skipped.
        grad_norm: 0-dim fp32, ||g|| of the first gradient (||T g|| for ASAM, ||g_N|| for SAM-ON,
            the mean over parts for m-sharpness), after unscaling.
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


class StepSetup(NamedTuple):
    """A step's validated inputs, flattened once: what the pipeline's parts share."""

    leaves: list  # the parameters, detached, in optree order
    spec: Any  # the treespec that rebuilds params (and every per-parameter state field)
    state: Any  # the base optimizer's state with its per-parameter fields flattened
    base: BaseOptimizer
    rho: float | Tensor
    lr: float | Tensor
    options: SAMOptions  # perturb_mask as one Python bool per leaf (or None)
    loss_scale: LossScaleState | None


class PassResult(NamedTuple):
    """The gradients a mode sees, the step's reported norm and its verdict."""

    gradients: StepGradients
    grad_norm: Tensor
    finite: Tensor


def resolve_options(options: SAMOptions | None, **shorthand) -> SAMOptions:
    """``options``, or ``SAMOptions(...)`` built from the keywords a step was given (None = not given)."""
    given = {name: value for name, value in shorthand.items() if value is not None}
    if options is None:
        return check_options(SAMOptions(**given))
    if given:
        raise ValueError(f"{', '.join(sorted(given))} given together with options=: put them in the options, "
                         f"e.g. options=options._replace({', '.join(f'{k}={v!r:.20}' for k, v in given.items())})")
    return check_options(options)


def prepare_step(params: PyTree, loss_fn: Callable, rho, lr, base_state, base: BaseOptimizer,
                 options: SAMOptions, loss_scale: LossScaleState | None = None) -> StepSetup:
    """Validate a step's inputs (raising with the argument's name and the fix) and flatten them once."""
    check_scalar("lr", lr, allow_tensor=True)
    check_scalar("rho", rho, allow_tensor=True)
    check_options(options)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, buffers, batch), got {loss_fn!r}")
    if loss_scale is not None and not isinstance(loss_scale, LossScaleState):
        raise TypeError(f"loss_scale must be a funcsam.LossScaleState (from funcsam.init_loss_scale()) or None, "
                        f"got {type(loss_scale).__name__} {loss_scale!r}")
    check_params(params)
    options = options._replace(perturb_mask=perturb_mask_leaves(options.perturb_mask, params))
    leaves, spec = flatten(params)
    # Detached: parameters straight from named_parameters() would otherwise chain every step's
    # update into one autograd graph that lives as long as the parameters do.
    leaves = [leaf.detach() for leaf in leaves]
    state = flatten_state(base, base_state, params, spec, leaves)
    return StepSetup(leaves, spec, state, base, rho, lr, options, loss_scale)


def run_pipeline(setup: StepSetup, mode: Mode, source: Any, own: Any, loss_fn: Callable, buffers: PyTree,
                 batch: Any, take_sam: bool) -> tuple[SAMStepOutput, Any]:
    """One step of ``mode`` over ``source``: ``(output with the base state, the mode's own state after)``."""
    if mode.rho_scale != 1:
        setup = setup._replace(rho=setup.rho * mode.rho_scale)
    gradient = gradient_fn(loss_fn, setup)
    perturbs = take_sam and not is_static_zero(setup.rho)
    point = setup.leaves
    if perturbs and mode.ascent == "momentum":
        ascent, _ = perturb(setup, setup.base.momentum_of(setup.state))
        point = torch._foreach_sub(setup.leaves, ascent)
    first = source.first_pass(gradient, point, buffers, batch)
    if perturbs and mode.ascent == "gradient":
        second_batch = batch if first.second_batch is None else first.second_batch  # TopK's k examples
        ascent = climb(setup, mode, source, first.units)
        first = first._replace(units=None)  # g is not held through the second pass (unless the mode keeps it)
        result = sam_gradients(setup, source, ascent, gradient, buffers, second_batch)
    else:
        result = one_pass_gradients(setup, first.units)
    finite = result.finite & torch.isfinite(first.loss)
    grads, own_after = mode.direction(result.gradients, own, setup.options.eps)
    own_after = mode.observe(own, own_after, result.gradients, finite)
    out = finish_step(setup, grads, finite, result.grad_norm, buffers, first.new_buffers, first.loss, first.aux)
    return out, own_after


def one_pass_gradients(setup: StepSetup, units: list) -> PassResult:
    """A step's single pass (the base step, MSAM's pass at w + e): g = the units' mean, reduced and unscaled."""
    grads = units[0] if len(units) == 1 else mean_of(units)
    if setup.options.grad_reduce is not None:
        grads = reduce_gradients(setup.options.grad_reduce, grads)
    grads = unscale(grads, setup.loss_scale)
    grad_norm = global_norm(grads)
    return PassResult(StepGradients(grads, None, grad_norm), grad_norm, torch.isfinite(grad_norm))


class Climb(NamedTuple):
    """A SAM step's ascent, formed from the first pass's units before the second pass runs."""

    perturbations: list  # e_k, one list per unit; the source's second pass may turn them into w + e_k in place
    norms: Tensor  # (units,): ||g_k|| (||T g_k|| for ASAM, ||g_N|| for SAM-ON)
    first: list | None  # g (the units' mean, reduced as the mode needs it), only where the mode reads it
    first_norm: Tensor | None  # ||g|| where it is norms[0] itself, else None


def climb(setup: StepSetup, mode: Mode, source: Any, units: list) -> Climb:
    """Each unit's perturbation from its own gradient (reduced first under ``sam_sync="global"``).

    The units are not kept: once e is formed, plain SAM needs nothing of g, so the step holds no g
    through the second pass; a mode that reads g (``mode.uses_first_gradient``) keeps its mean."""
    options, loss_scale = setup.options, setup.loss_scale
    reduce = options.grad_reduce
    local = perturbs_locally(setup, source)
    if reduce is not None and not local:
        units = [reduce_gradients(reduce, grads) for grads in units]
    units = [unscale(grads, loss_scale) for grads in units]
    perturbations, norms = zip(*[perturb(setup, grads) for grads in units])
    norms = torch.stack(norms)

    first_grads, first_norm = None, None
    if mode.uses_first_gradient:
        first_grads = units[0] if len(units) == 1 else mean_of(units)
        if reduce is not None and local:
            first_grads = reduce_gradients(reduce, first_grads)
        plain = not options.adaptive and (options.perturb_mask is None or all(options.perturb_mask))
        if plain and len(units) == 1 and not (reduce is not None and local):
            first_norm = norms[0]  # perturb's norm is ||g|| itself: no second reduction
    return Climb([list(e) for e in perturbations], norms, first_grads, first_norm)


def perturbs_locally(setup: StepSetup, source: Any) -> bool:
    """Each unit perturbs with its own, unreduced gradient: m-sharpness parts, or ``sam_sync="local"``."""
    return source.local or setup.options.sam_sync == "local"


def sam_gradients(setup: StepSetup, source: Any, ascent: Climb, gradient: Callable, buffers: PyTree,
                  batch: Any) -> PassResult:
    """The second pass at w + e_k for each unit (``source.second_pass``), reduced across replicas and unscaled.

    Under ``sam_sync="local"`` or m-sharpness with ``grad_reduce``, a replica whose first gradient
    overflowed poisons the reduced SAM gradient, so every replica skips alike; a mode that uses g
    then gets it reduced too (one more all-reduce, of the first gradient, in :func:`climb`)."""
    reduce, loss_scale = setup.options.grad_reduce, setup.loss_scale
    sam_grads = source.second_pass(gradient, setup.leaves, ascent.perturbations, buffers, batch)
    if reduce is not None:
        if perturbs_locally(setup, source):  # norms.sum() is non-finite exactly when some unit's norm is
            sam_grads = spread_non_finite(sam_grads, ascent.norms.sum())
        sam_grads = reduce_gradients(reduce, sam_grads)
    sam_grads = unscale(sam_grads, loss_scale)
    finite = torch.isfinite(ascent.norms).all() & torch.isfinite(global_norm(sam_grads))
    return PassResult(StepGradients(ascent.first, sam_grads, ascent.first_norm), ascent.norms.mean(), finite)


def finish_step(setup: StepSetup, grads: list, finite: Tensor, grad_norm: Tensor, buffers: PyTree,
                new_buffers: PyTree, loss: Tensor, aux: Any) -> SAMStepOutput:
    """The descent half of every SAM step: clip, base update, and keep the old params, buffers and
    state (``finite`` False, the loss scale backing off) when the loss or a gradient was non-finite."""
    if setup.options.max_grad_norm is not None:
        grads, _ = clip_by_global_norm(grads, setup.options.max_grad_norm)
    stepped, stepped_state = setup.base.update(setup.leaves, grads, setup.state, setup.lr)

    old_buffer_leaves, buffer_spec = flatten(buffers)
    new_buffer_leaves, new_buffer_spec = flatten(new_buffers)
    if not same_structure(new_buffer_spec, buffer_spec):
        raise ValueError("loss_fn returned new_buffers with a structure different from the buffers it was given")
    loss_scale = setup.loss_scale
    # Eager on the CPU a skipped step returns its inputs as they are (no torch.where copy).
    keep, keep_state = picker(finite), picker(finite, select_state)
    return SAMStepOutput(
        params=unflatten(setup.spec, keep(stepped, setup.leaves)),
        buffers=unflatten(buffer_spec, keep(new_buffer_leaves, old_buffer_leaves)),
        momentum_state=unflatten_state(setup.spec, keep_state(stepped_state, setup.state)),
        loss=loss,
        aux=aux,
        finite=finite,
        grad_norm=grad_norm,
        loss_scale=None if loss_scale is None else update_loss_scale(loss_scale, finite),
    )


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


def gradient_fn(loss_fn: Callable, setup: StepSetup):
    """``(leaves, buffers, batch) -> (grads, (loss, new_buffers, aux))``, the loss scaled if asked.

    ``torch.func.grad`` lets only tensors out as auxiliary outputs, so ``aux`` travels flattened
    (None, an empty tuple and the like have no leaves) and is rebuilt outside.
    """
    aux_spec = {}
    spec = setup.spec
    # The scale enters the differentiated function as an argument, not through its closure: Dynamo
    # in torch 2.11 fails on a tensor closed over inside torch.func.grad.
    scale = None if setup.loss_scale is None else setup.loss_scale.scale

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

    gradient.params_of = lambda leaves: unflatten(spec, leaves)  # for a source that calls a function of params
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
