"""GSAM: SAM's gradient minus a little of g's part orthogonal to it, no extra pass.

Zhuang et al., "Surrogate Gap Minimization Improves Sharpness-Aware Training", ICLR 2022, arXiv
2203.08065, Algorithm 1. With g and g_sam SAM's two gradients::

    g_orth = g - (g . g_sam / (||g_sam||^2 + eps)) g_sam      g's part orthogonal to g_sam
    d      = g_sam - alpha * g_orth                           descends the perturbed loss, ascends the gap
    w, s   = base.update(w, d, s; lr)

``alpha = 0`` is SAM bit for bit. The paper also moves rho with lr (rho_t proportional to lr_t):
pass such a rho each step (a 0-dim tensor does not recompile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..hyperparameters import check_scalar
from ..tree import Tensor
from .looksam import orthogonal_part
from .protocol import Mode, StepGradients

__all__ = ["GSAM", "gsam_direction"]


@dataclass(frozen=True)
class GSAM(Mode):
    """GSAM (module docstring). Field: ``alpha``, a real >= 0, the weight of the ascent on the
    surrogate gap. The paper tunes it per task; 0.2 is the authors' PyTorch CIFAR-10 example (their
    ViT-B/32 ImageNet configuration uses 0.6)."""

    alpha: float = 0.2

    example = "funcsam.GSAM(alpha=0.2)"

    def __post_init__(self):
        check_scalar("alpha", self.alpha)

    @property
    def uses_first_gradient(self) -> bool:  # alpha = 0 leaves SAM's gradient untouched and needs no g
        return self.alpha != 0

    def direction(self, gradients: StepGradients, own: Any, eps: float) -> tuple[list, Any]:
        if gradients.sam is None or self.alpha == 0:
            return super().direction(gradients, own, eps)
        return gsam_direction(gradients.first, gradients.sam, self.alpha, eps), own


def gsam_direction(first_grads: list[Tensor], sam_grads: list[Tensor], alpha: float, eps: float) -> list[Tensor]:
    """GSAM's update direction d = g_sam - alpha * g_orth, g_orth = g - (g . g_sam / (||g_sam||^2 + eps)) g_sam."""
    return torch._foreach_sub(sam_grads, torch._foreach_mul(orthogonal_part(first_grads, sam_grads, eps), alpha))
