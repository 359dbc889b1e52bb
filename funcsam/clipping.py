"""Global-norm clipping of the SAM gradient, the placement of the official implementation.

    g <- g * min(1, max_norm / (||g||_2 + 1e-6))

It is applied to the gradient at w + e, just before the descent step. (Clipping the first gradient
would change nothing: the perturbation is normalised by its norm anyway.)
"""

from __future__ import annotations

from typing import Sequence

import torch

from .tree import Tensor, global_norm


def clip_by_global_norm(grads: Sequence[Tensor], max_norm: float,
                        norm: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
    """``(clipped_grads, norm_before_clipping)``, with torch.nn.utils.clip_grad_norm_'s coefficient.
    ``norm``: ``global_norm(grads)`` where the caller has it already (under sharding, one all-reduce less)."""
    norm = global_norm(grads) if norm is None else norm
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return torch._foreach_mul(list(grads), coefficient), norm
