"""m-sharpness on one device: every part of the batch perturbs the weights with its own gradient.

Foret et al. (2020, section 4.1) found that SAM generalises better when the perturbation comes from
small sub-batches of size m (on TPUs, one per core) than from the whole batch. With the batch cut
into K equal contiguous parts B_1 .. B_K (m = B / K)::

    g_k     = grad L_{B_k}(w)                         k = 1 .. K, one vmapped call
    e_k     = rho * g_k / (||g_k||_2 + eps)           (ASAM: rho * T^2 g_k / (||T g_k||_2 + eps))
    g_sam   = (1/K) sum_k grad L_{B_k}(w + e_k)       one vmapped call, then the mean over parts
    w, s    = base.update(w, g_sam, s; lr)            the same descent as sam_step

Usage::

    out = funcsam.m_sharpness_sam_step(params, buffers, (x, y), loss_fn, rho=0.05, lr=0.1,
                                       momentum_state=state, m=4, momentum=0.9, weight_decay=5e-4)

The 2K gradient evaluations are two ``torch.func.vmap`` calls over the parts, not a Python loop.
The perturbation itself (O(#params) arithmetic) is funcsam's ``perturbation_and_norm`` applied to
each part's gradient in turn, because the foreach kernels it runs on have no vmap batching rule.

BatchNorm semantics (in training mode): each part is normalised with its own batch statistics
("ghost" BatchNorm over parts of m examples, as if each part were on its own device). The returned
running statistics are the mean over the K parts of each part's updated statistics: for the running
mean this equals one update with the full-batch mean; the running variance becomes the mean of the
per-part (unbiased) variances. Integer buffers (``num_batches_tracked``) take part 0's value, i.e.
they advance once per step. As in ``sam_step``, the perturbed pass's updates are discarded.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .base import BaseOptimizer
from .batching import stack_parts
from .engine import (
    GradReduce, SAMGradient, SAMOptions, SAMStepOutput, StepSetup, check_batch, finish_step, gradient_fn, perturb,
    prepare_step, reduce_gradients, resolve_base, spread_non_finite, unscale,
)
from .hyperparameters import is_static_zero
from .loss_scale import LossScaleState
from .step import sam_step
from .tree import PyTree, Tensor, flatten, global_norm, unflatten


def m_sharpness_sam_step(
    params: PyTree,
    buffers: PyTree,
    batch: Any,
    loss_fn: Callable,
    rho: float | Tensor,
    lr: float | Tensor,
    momentum_state: Any,
    *,
    m: int,
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
) -> SAMStepOutput:
    """One SAM step whose perturbation is computed separately on each of ``m`` equal parts of ``batch``.

    Pure, like :func:`funcsam.sam_step`, and takes the same arguments plus ``m``:

    Args:
        m: the number of parts K (each part holds ``B / K`` examples); it must divide the batch
            size B. ``m=1`` calls :func:`funcsam.sam_step` (with ``sam_sync="local"``), which
            computes the same step without vmap's overhead.
        batch: a pytree of tensors with a common leading batch dimension, e.g. ``(inputs, targets)``;
            part k is rows ``k*B/K .. (k+1)*B/K - 1``.
        loss_fn: as for ``sam_step``; it sees one part at a time (under ``torch.func.vmap``), so it
            must be vmappable (``funcsam.make_loss_fn`` is). Random ops (dropout) draw different
            numbers in each part.
        grad_reduce: applied to the part-averaged SAM gradient only: under data parallelism every
            replica's parts perturb with their own gradients (the ``sam_sync="local"`` semantics),
            and a non-finite first gradient anywhere skips the step on every replica.
        The other arguments are ``sam_step``'s, with its semantics.

    Returns:
        :class:`funcsam.SAMStepOutput` with ``loss`` the mean of the K part losses (the full-batch
        loss for a mean-reduced criterion), ``aux`` the parts' auxes concatenated along dim 0 in
        batch order (logits come back ``(B, C)``; a 0-dim aux leaf comes back stacked, shape
        ``(K,)``), ``grad_norm`` the mean over parts of ``||g_k||`` (``||T g_k||`` for ASAM), and
        ``finite`` False, with the step skipped, when any part's gradient was non-finite.
        ``buffers`` follow the BatchNorm semantics in the module docstring.
    """
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"m (the number of m-sharpness parts) must be a positive int, got {m!r}")
    base = resolve_base(base, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    if m == 1:
        return sam_step(params, buffers, batch, loss_fn, rho, lr, momentum_state, base=base, adaptive=adaptive,
                        eta=eta, eps=eps, max_grad_norm=max_grad_norm, loss_scale=loss_scale,
                        grad_reduce=grad_reduce, sam_sync="local")
    setup = prepare_step(params, loss_fn, rho, lr, momentum_state, base,
                         SAMOptions(adaptive, eta, eps, max_grad_norm, loss_scale, grad_reduce, "local"))
    return vmapped_m_sharpness_step(setup, buffers, batch, loss_fn, m)


def vmapped_m_sharpness_step(setup: StepSetup, buffers: PyTree, batch: Any, loss_fn: Callable, m: int) -> SAMStepOutput:
    """:func:`m_sharpness_sam_step` for any ``m >= 1``, always through vmap."""
    check_batch(batch)
    parts = stack_parts(batch, m)
    buffer_leaves, buffer_spec = flatten(buffers)
    # Each part updates its own copy of the running statistics in place (BatchNorm writes into the
    # buffers it is given); an unbatched buffer cannot receive a batched update under vmap.
    part_buffers = unflatten(buffer_spec, [leaf.expand(m, *leaf.shape).clone() for leaf in buffer_leaves])
    gradient = gradient_fn(loss_fn, setup)
    loss_scale = setup.options.loss_scale

    def first_pass(part_buffers, part):
        return gradient(setup.leaves, part_buffers, part)

    def perturbed_pass(perturbed_leaves, part_buffers, part):
        return gradient(perturbed_leaves, part_buffers, part)[0]

    part_grads, (part_losses, part_new_buffers, part_aux) = torch.func.vmap(
        first_pass, randomness="different"
    )(part_buffers, parts)
    part_grads = unscale(part_grads, loss_scale)

    if is_static_zero(setup.rho):
        part_sam_grads = part_grads
        part_norms = torch.stack([global_norm(grads) for grads in _unstack(part_grads)])
    else:
        perturbations, norms = zip(*[perturb(setup, grads) for grads in _unstack(part_grads)])
        part_norms = torch.stack(norms)
        perturbed = torch._foreach_add(_stack(perturbations), setup.leaves)  # (K, ...) + (...) broadcasts
        part_sam_grads = torch.func.vmap(perturbed_pass, randomness="different")(perturbed, part_buffers, parts)
        part_sam_grads = unscale(part_sam_grads, loss_scale)

    sam_grads = [grad.mean(dim=0) for grad in part_sam_grads]
    norms_finite = torch.isfinite(part_norms).all()
    if setup.options.grad_reduce is not None:
        # part_norms.sum() is non-finite exactly when some part's norm is.
        sam_grads = reduce_gradients(setup.options.grad_reduce, spread_non_finite(sam_grads, part_norms.sum()))
    finite = norms_finite & torch.isfinite(global_norm(sam_grads))
    return finish_step(setup, SAMGradient(sam_grads, part_norms.mean(), finite), buffers,
                       combine_part_buffers(part_new_buffers), part_losses.mean(), concatenate_parts(part_aux))


def combine_part_buffers(part_buffers: PyTree) -> PyTree:
    """One buffer pytree from per-part buffers stacked on dim 0: the mean over parts of floating
    leaves (running statistics), part 0's value of the others (counters, equal in every part)."""
    leaves, spec = flatten(part_buffers)
    return unflatten(spec, [
        leaf.mean(dim=0) if leaf.is_floating_point() else leaf[0] for leaf in leaves
    ])


def concatenate_parts(part_aux: Any) -> Any:
    """Per-part outputs stacked on dim 0, ``(K, B/K, ...)``, concatenated back to ``(B, ...)``;
    leaves with no per-example dimension (``(K,)``) stay stacked."""
    leaves, spec = flatten(part_aux)
    return unflatten(spec, [
        leaf.reshape(leaf.shape[0] * leaf.shape[1], *leaf.shape[2:]) if leaf.dim() >= 2 else leaf
        for leaf in leaves
    ])


def _unstack(stacked: list[Tensor]) -> list[list[Tensor]]:
    """Leaves stacked over parts, ``L`` tensors of shape ``(K, ...)``, as ``K`` lists of ``L`` views."""
    return [list(part) for part in zip(*[leaf.unbind(0) for leaf in stacked])]


def _stack(per_part: Any) -> list[Tensor]:
    """The inverse of :func:`_unstack`: ``K`` lists of ``L`` tensors to ``L`` tensors of shape ``(K, ...)``."""
    return [torch.stack(leaf_parts) for leaf_parts in zip(*per_part)]
