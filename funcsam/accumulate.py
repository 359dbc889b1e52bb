"""Gradient accumulation: one SAM step over several micro-batches that do not fit in memory at once.

SAM needs the full-batch gradient before it can perturb, so both passes are accumulated, each over
all the micro-batches B_1 .. B_K (sizes n_i, N = sum n_i)::

    g      = sum_i (n_i / N) grad L_{B_i}(w)            first pass, accumulated
    e      = rho * g / (||g||_2 + eps)                  one perturbation (ASAM as in sam_step)
    g_sam  = sum_i (n_i / N) grad L_{B_i}(w + e)        second pass, accumulated
    w, s   = base.update(w, g_sam, s; lr)              the same descent as sam_step

For a loss that is the mean over its examples this is exactly the step on the concatenated batch
(up to float rounding), for models without BatchNorm. Memory holds one micro-batch's activations
and two gradient-sized accumulators.

Usage::

    micro_batches = funcsam.split_batch((x, y), 4)          # or any list of batches
    out = funcsam.accumulated_sam_step(params, buffers, micro_batches, loss_fn, rho=0.05, lr=0.1,
                                       momentum_state=state, momentum=0.9)

BatchNorm semantics (training mode): each micro-batch is normalised with its own statistics, and the
first pass threads the running statistics through the micro-batches in order, as K consecutive
training forwards would (``num_batches_tracked`` advances by K). The perturbed pass runs every
micro-batch with the step's input buffers and its updates are discarded, as in ``sam_step``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .base import BaseOptimizer
from .batching import batch_size
from .engine import (
    GradReduce, SAMOptions, SAMStepOutput, check_batch, finish_step, gradient_fn, prepare_step, resolve_base,
    sam_gradient,
)
from .loss_scale import LossScaleState
from .tree import PyTree, Tensor, flatten, unflatten


def accumulated_sam_step(
    params: PyTree,
    buffers: PyTree,
    micro_batches: Sequence[Any],
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
) -> SAMStepOutput:
    """One SAM step whose two gradients are each accumulated over ``micro_batches``.

    Pure, like :func:`funcsam.sam_step`, and takes the same arguments, except:

    Args:
        micro_batches: a non-empty sequence of batches for ``loss_fn``, each a pytree of tensors with
            a common leading batch dimension (:func:`funcsam.split_batch` cuts one batch into K).
            Micro-batch i is weighted by its size n_i / N, which assumes ``loss_fn`` returns the mean
            over its examples.
        grad_reduce, sam_sync: as for ``sam_step``, applied once per step to the accumulated
            gradients (one all-reduce per pass, not one per micro-batch).

    Returns:
        :class:`funcsam.SAMStepOutput` with ``loss`` the size-weighted mean of the micro-batch
        losses (the whole-batch loss), ``aux`` the micro-batches' auxes concatenated along dim 0 (a
        0-dim aux leaf comes back stacked, shape ``(K,)``), and ``buffers`` after the first pass
        over all micro-batches in order (see the module docstring).
    """
    setup = prepare_step(
        params, loss_fn, rho, lr, momentum_state,
        resolve_base(base, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov),
        SAMOptions(adaptive, eta, eps, max_grad_norm, loss_scale, grad_reduce, sam_sync),
    )
    if isinstance(micro_batches, (torch.Tensor, tuple, dict)) or not isinstance(micro_batches, Sequence):
        raise TypeError(
            "micro_batches must be a list of batches, e.g. funcsam.split_batch((inputs, targets), K); "
            f"got {type(micro_batches).__name__}"
        )
    if len(micro_batches) == 0:
        raise ValueError("micro_batches is empty: pass at least one batch")
    for index, micro_batch in enumerate(micro_batches):
        check_batch(micro_batch, f"micro_batches[{index}]")
    sizes = [batch_size(micro_batch) for micro_batch in micro_batches]
    weights = [size / sum(sizes) for size in sizes]
    gradient = gradient_fn(loss_fn, setup)

    grads, losses, auxes, new_buffers = None, [], [], buffers
    for micro_batch, weight in zip(micro_batches, weights):
        micro_grads, (loss, new_buffers, aux) = gradient(setup.leaves, new_buffers, micro_batch)
        grads = _accumulate(grads, micro_grads, weight)
        losses.append(loss * weight)
        auxes.append(aux)

    def accumulated_gradient_at(perturbed):
        sam_grads = None
        for micro_batch, weight in zip(micro_batches, weights):
            sam_grads = _accumulate(sam_grads, gradient(perturbed, buffers, micro_batch)[0], weight)
        return sam_grads

    sam = sam_gradient(setup, grads, accumulated_gradient_at)
    return finish_step(setup, sam, buffers, new_buffers, torch.stack(losses).sum(), _concatenate_micro_batches(auxes))


def _accumulate(total: list[Tensor] | None, grads: list[Tensor], weight: float) -> list[Tensor]:
    """``total + weight * grads`` (just ``weight * grads`` for the first micro-batch), out of place."""
    if total is None:
        return torch._foreach_mul(grads, weight)
    return torch._foreach_add(total, grads, alpha=weight)


def _concatenate_micro_batches(auxes: list) -> Any:
    """The micro-batches' auxes joined along dim 0 (``(n_i, ...)`` leaves) or stacked (0-dim leaves)."""
    specs = {flatten(aux)[1] for aux in auxes}
    if len(specs) != 1:
        raise ValueError("loss_fn returned aux values of different structures for different micro-batches")
    leaves_per_batch = [flatten(aux)[0] for aux in auxes]
    joined = [
        torch.stack(leaf_parts) if leaf_parts[0].dim() == 0 else torch.cat(leaf_parts)
        for leaf_parts in zip(*leaves_per_batch)
    ]
    return unflatten(specs.pop(), joined)
