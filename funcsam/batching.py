"""Cutting a batch into equal parts along its leading dimension.

A batch is any pytree of tensors that share the leading (example) dimension, e.g. ``(inputs, targets)``.
Three cuts are used by funcsam, all in batch order (part k holds examples ``k*B/K .. (k+1)*B/K - 1``):

    shard_batch(batch, rank, world_size)   the rows one data-parallel rank trains on
    split_batch(batch, parts)              a list of ``parts`` micro-batches (gradient accumulation)
    stack_parts(batch, parts)              one batch whose leaves gain a leading ``parts`` dim (vmap)

Contiguous parts keep the data order of one process: the mean over parts of the per-part mean loss
is the full-batch mean loss, so averaging per-part gradients gives the full-batch gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from .tree import flatten, unflatten


def batch_size(batch: Any) -> int:
    """The common leading dimension of every tensor in ``batch``; raises if they disagree."""
    leaves, _ = flatten(batch)
    if not leaves:
        raise ValueError("the batch holds no tensors: pass e.g. (inputs, targets)")
    sizes = set()
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            raise TypeError(
                f"every leaf of the batch must be a tensor with a leading batch dimension, "
                f"got {type(leaf).__name__} {tuple(getattr(leaf, 'shape', ()))}"
            )
        sizes.add(leaf.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"the batch's tensors disagree on the batch size (leading dimension): {sorted(sizes)}")
    return sizes.pop()


def part_size(batch: Any, parts: int, what: str = "parts") -> int:
    """``B / parts``, with an error naming ``what`` when ``parts`` does not divide the batch size B."""
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"the number of {what} must be a positive int, got {parts!r}")
    size = batch_size(batch)
    if size % parts != 0:
        raise ValueError(
            f"the batch size {size} is not divisible by the number of {what} {parts}: "
            f"choose a batch size that is a multiple of {parts} (e.g. {size - size % parts or parts})"
        )
    return size // parts


def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s contiguous ``1/world_size`` of the global ``batch`` (views, no copy).

    Every rank draws the same global batch (same seed) and keeps its own rows, so the replicas
    together see exactly what one process would.
    """
    size = part_size(batch, world_size, what="processes (world size)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    leaves, spec = flatten(batch)
    return unflatten(spec, [leaf[rank * size:(rank + 1) * size] for leaf in leaves])


def split_batch(batch: Any, parts: int) -> list:
    """``batch`` cut into ``parts`` equal micro-batches, in order (views, no copy)."""
    size = part_size(batch, parts, what="micro-batches")
    leaves, spec = flatten(batch)
    return [unflatten(spec, [leaf[k * size:(k + 1) * size] for leaf in leaves]) for k in range(parts)]


def stack_parts(batch: Any, parts: int) -> Any:
    """``batch`` with every leaf reshaped from ``(B, ...)`` to ``(parts, B / parts, ...)`` (a view)."""
    size = part_size(batch, parts, what="m-sharpness parts")
    leaves, spec = flatten(batch)
    return unflatten(spec, [leaf.reshape(parts, size, *leaf.shape[1:]) for leaf in leaves])
