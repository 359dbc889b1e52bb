"""LookSAM: SAM's extra direction, measured every k steps and reused on the steps between.

Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022, arXiv
2203.02714, Algorithm 1. With g = grad L(w) and, on SAM steps, g_sam = grad L(w + e)::

    step % k == 0:  d = g_sam,  g_v = g_sam - (g . g_sam / (||g||^2 + eps)) g         (two passes, g_v kept)
    otherwise:      d = g + alpha * ||g|| * g_v / (||g_v|| + eps)                       (one pass)
    then            w, s = base.update(w, d, s; lr)

g_v starts at zero, so a cheap step before the first SAM step is the base step. A skipped
(non-finite) step keeps g_v with the rest of the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..hyperparameters import check_int, check_scalar
from ..tree import PyTree, Tensor, dot, dots
from .protocol import Mode, StepGradients, check_step

__all__ = ["LookSAM", "LookSAMState", "looksam_estimate", "orthogonal_part"]


class LookSAMState(NamedTuple):
    """The pure step's state under ``mode=LookSAM(...)``.

    Fields:
        base_state: the base optimizer's state (``MomentumState`` or ``AdamState``).
        g_v: a pytree shaped like ``params``: the part of the last SAM step's g_sam orthogonal to
            its g (zeros before the first SAM step).
    """

    base_state: Any
    g_v: PyTree


class LookSAMBuffers(NamedTuple):
    """LookSAM's own state over flat parameter lists (what the optimizers keep)."""

    g_v: list


@dataclass(frozen=True)
class LookSAM(Mode):
    """LookSAM (module docstring). Fields: ``k``, an int >= 1, the interval between SAM steps (the
    paper's 5); ``alpha``, a real >= 0, the weight of the reused direction (the paper's 0.7)."""

    k: int = 5
    alpha: float = 0.7

    uses_first_gradient = True
    two_halves = False
    state_type = LookSAMState
    own_type = LookSAMBuffers
    per_parameter = ("g_v",)
    checkpoint_key = "looksam_g_v"
    example = "funcsam.LookSAM(k=5, alpha=0.7)"

    def __post_init__(self):
        check_int("k", self.k, minimum=1, meaning="SAM runs on steps 0, k, 2k, ...")
        check_scalar("alpha", self.alpha)

    def takes_sam(self, step: int, state: Any = None) -> bool:
        check_step(step)
        return step % self.k == 0

    def init(self, params: list) -> LookSAMBuffers:
        return LookSAMBuffers([torch.zeros_like(p) for p in params])

    def direction(self, gradients: StepGradients, own: LookSAMBuffers, eps: float) -> tuple[list, LookSAMBuffers]:
        if gradients.sam is None:
            return looksam_estimate(gradients.first, self.first_norm(gradients), own.g_v, self.alpha, eps), own
        return gradients.sam, LookSAMBuffers(orthogonal_part(gradients.sam, gradients.first, eps))


def looksam_estimate(grads: list, grad_norm: Tensor, g_v: list, alpha: float, eps: float) -> list:
    """LookSAM's one-pass estimate of g_sam, g + alpha * ||g|| * g_v / (||g_v|| + eps) (``grad_norm`` is
    ||g||). ``g_v`` is scaled to unit norm first, so a zero ``g_v`` gives exactly ``g`` and no
    coefficient can overflow."""
    unit = torch._foreach_mul(g_v, 1.0 / (dot(g_v, g_v).sqrt() + eps))
    return torch._foreach_add(grads, torch._foreach_mul(unit, alpha * grad_norm))


def orthogonal_part(x: list[Tensor], y: list[Tensor], eps: float) -> list[Tensor]:
    """``x - (x . y / (||y||^2 + eps)) y``: the part of ``x`` orthogonal to ``y`` (global dot products
    over aligned flat leaf lists, in fp32). It is bounded by ``||x||``, so it stays finite."""
    x_dot_y, y_dot_y = dots([(x, y), (y, y)])  # one all-reduce for both under sharding
    coefficient = x_dot_y / (y_dot_y + eps)
    return torch._foreach_sub(x, torch._foreach_mul(y, coefficient))
