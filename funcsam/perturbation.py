"""SAM's ascent step: the perturbation e added to the weights before the second pass.

    SAM  (Foret et al. 2020):   e = rho * g / (||g||_2 + eps)
    ASAM (Kwon et al. 2021):    e = rho * T^2 g / (||T g||_2 + eps),   T = |w| + eta

The norm is global: one scalar over every leaf of the gradient, across parameter groups.
A zero gradient gives e = 0 (never NaN), because eps > 0 keeps the denominator positive.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .tree import Tensor, global_norm


def ascent_direction(
    grads: Sequence[Tensor], params: Sequence[Tensor], *, adaptive: bool = False, eta: float = 0.0
) -> tuple[list[Tensor], list[Tensor]]:
    """The unnormalised ascent direction and the vectors whose global norm normalises it.

    Returns ``(direction, normed)``: ``(g, g)`` for SAM, ``(T^2 g, T g)`` with ``T = |w| + eta``
    for ASAM. Flat lists aligned with ``grads``.
    """
    grads = list(grads)
    if not adaptive:
        return grads, grads
    scale = torch._foreach_abs(list(params))
    if eta:
        torch._foreach_add_(scale, eta)
    normed = torch._foreach_mul(grads, scale)
    direction = torch._foreach_mul(normed, scale)
    return direction, normed


def sam_perturbation(
    direction: Sequence[Tensor], norm: Tensor, rho: float | Tensor, eps: float = 1e-12
) -> list[Tensor]:
    """e = rho * direction / (norm + eps), leafwise. ``rho`` may be a float or a 0-dim tensor."""
    coefficient = rho / (norm + eps)
    return torch._foreach_mul(list(direction), coefficient)


def perturbation_and_norm(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    rho: float | Tensor,
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
) -> tuple[list[Tensor], Tensor]:
    """``(e, ||g||)`` (``||T g||`` for ASAM) for one rho shared by every leaf."""
    direction, normed = ascent_direction(grads, params, adaptive=adaptive, eta=eta)
    norm = global_norm(normed)
    return sam_perturbation(direction, norm, rho, eps), norm
