"""The descent step, with torch.optim.SGD's exact semantics, on flat leaf lists.

    d   = g + weight_decay * w
    buf = d                                          on the first step
    buf = momentum * buf + (1 - dampening) * d       afterwards
    d   = d + momentum * buf  (nesterov)   or   d = buf
    w   = w - lr * d

With momentum == 0 there is no buffer and d is used as is. ``first_step`` may be a Python bool (the
stateful optimizer) or a 0-dim bool tensor (the pure step, where a Python branch would recompile).
Buffers must be zeros on the first step: ``momentum * 0 + 1 * d == d`` gives SGD's ``buf = d.clone()``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .tree import Tensor


def sgd_direction(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    first_step: bool | Tensor,
) -> tuple[list[Tensor], list[Tensor]]:
    """``(d, new_buffers)``: the direction to subtract (times lr) and the new momentum buffers.

    Pure: nothing passed in is modified. With ``momentum == 0`` the buffers come back unchanged.
    """
    grads = list(grads)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, list(params), alpha=weight_decay)
    if momentum == 0:
        return grads, list(momentum_buffers)
    new_buffers = torch._foreach_mul(list(momentum_buffers), momentum)
    if dampening == 0:
        torch._foreach_add_(new_buffers, grads)
    elif isinstance(first_step, bool):
        torch._foreach_add_(new_buffers, grads, alpha=1.0 if first_step else 1.0 - dampening)
    else:
        grad_coefficient = torch.where(first_step, 1.0, 1.0 - dampening)
        torch._foreach_add_(new_buffers, torch._foreach_mul(grads, grad_coefficient))
    if nesterov:
        return torch._foreach_add(grads, new_buffers, alpha=momentum), new_buffers
    return new_buffers, new_buffers


def sgd_apply(params: Sequence[Tensor], direction: Sequence[Tensor], lr: float | Tensor) -> list[Tensor]:
    """w - lr * d, leafwise and out of place. ``lr`` may be a float or a 0-dim tensor."""
    if isinstance(lr, Tensor):
        return torch._foreach_sub(list(params), torch._foreach_mul(list(direction), lr))
    return torch._foreach_add(list(params), list(direction), alpha=-lr)
