"""MSAM: perturb along the momentum the base optimizer already holds, in one pass.

Becker et al., "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead", 2024,
arXiv 2401.12033::

    m      = the base's momentum before this step: momentum_buffer (SGD), exp_avg (Adam, AdamW)
    e      = -rho * m / (||m|| + eps)            (ASAM: -rho * T^2 m / (||T m|| + eps), T = |w| + eta)
    g      = grad L(w + e)                       the step's one pass
    w, s   = base.update(w, g, s; lr)            at w, not at w + e

With m = 0 (the first step) e = 0 and the step is the base step. There is no pass at w: the loss,
aux, BatchNorm statistics and ||g|| all come from the pass at w + e. The paper uses a larger rho
than SAM's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import Mode

__all__ = ["MSAM"]


@dataclass(frozen=True)
class MSAM(Mode):
    """Momentum-SAM (module docstring). Needs a base with momentum: ``funcsam.sgd(momentum > 0)``,
    Adam, AdamW (functional); ``torch.optim.SGD(momentum > 0)``, Adam, AdamW or ``SAMSGD`` with
    ``momentum > 0`` (optimizers)."""

    ascent = "momentum"
    two_halves = False
    example = "funcsam.MSAM()"

    def check_momentum(self, has_momentum: bool, where: str) -> None:
        if not has_momentum:
            raise ValueError(f"mode=MSAM() perturbs along the base optimizer's momentum, and {where} has none: "
                             "set momentum > 0 (e.g. 0.9), use Adam/AdamW, or choose another mode")
