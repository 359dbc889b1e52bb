"""The cheaper SAM modes of :class:`funcsam.SAM` and :class:`funcsam.SAMSGD`: one ``mode=`` keyword,
the math of :mod:`funcsam.modes` (whose formulas this module reuses on flat gradient lists).

With g = grad L(w) and g_sam = grad L(w + e) the gradients of a SAM step, ``optimizer.step(closure)``
takes, by the optimizer's own step index ``t = optimizer.steps_taken``::

    mode=None                 SAM on every step (two passes)
    mode=funcsam.every(k)     SAM where the schedule picks t (t % k == 0, or t >= start_step for
    mode=funcsam.late(s)      funcsam.late), the base optimizer's step with g on the others (one pass)
    LookSAM(k, alpha)         t % k == 0:  SAM, and keep g_v = g_sam - (g . g_sam / (||g||^2 + eps)) g
                              otherwise:   one pass, the base step with g + alpha * ||g|| * g_v / (||g_v|| + eps)
    MSAM()                    one pass at w + e, e = -rho * m / (||m|| + eps), m the base optimizer's
                              momentum (momentum_buffer of SGD, exp_avg of Adam/AdamW); back to w, base step
    GSAM(alpha)               SAM's two passes, then the base step with d = g_sam - alpha * g_orth,
                              g_orth = g - (g . g_sam / (||g_sam||^2 + eps)) g_sam
    AESAM(total_steps, delta) AE-SAM: SAM where the last step's ||g||^2 was high against its running
                              mean and variance (funcsam.policy), the base step with g elsewhere

Usage::

    optimizer = funcsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                            mode=LookSAM(k=5, alpha=0.7))
    loss = optimizer.step(closure)

Only ``mode=None`` and :class:`GSAM` fit ``first_step``/``second_step`` (two backward passes on every
step); the others decide per step how many passes to take, so they need ``step(closure)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any


from .hyperparameters import check_scalar
from .modes import Every, Late, every, gsam_direction, late, looksam_estimate, orthogonal_part
from .hyperparameters import check_int, is_finite_number
from .modes.aesam import check_delta, linear_threshold
from .tree import Tensor, global_norm

__all__ = ["AESAM", "GSAM", "MSAM", "LookSAM", "cheap_step_gradient", "check_mode", "check_two_halves",
           "keeps_first_gradient", "sam_step_gradient", "takes_full_sam"]


@dataclass(frozen=True)
class LookSAM:
    """LookSAM (Liu et al., CVPR 2022, arXiv 2203.02714): SAM on steps 0, k, 2k, ..., which also
    measure g_v, SAM's extra direction; the steps between take one pass and add
    ``alpha * ||g|| * g_v / (||g_v|| + eps)`` to their gradient. As :func:`funcsam.looksam_step`.

    Fields:
        k: an int >= 1, the interval between SAM steps (the paper's 5).
        alpha: a real >= 0, the weight of the reused direction (the paper's 0.7).
    """

    k: int = 5
    alpha: float = 0.7

    def __post_init__(self):
        Every(self.k)  # refuses a k that is not an int >= 1, naming it
        check_scalar("alpha", self.alpha)

    @property
    def schedule(self) -> Every:
        """The steps that take SAM and measure g_v: ``funcsam.every(k)``."""
        return Every(self.k)


@dataclass(frozen=True)
class MSAM:
    """Momentum-SAM (Becker et al. 2024, arXiv 2401.12033): one pass at w - rho * m / (||m|| + eps),
    m the base optimizer's momentum before the step, then the base step at w with that gradient. As
    :func:`funcsam.msam_step`. Needs a base with momentum: ``torch.optim.SGD(momentum > 0)``,
    Adam, AdamW, or :class:`funcsam.SAMSGD` with ``momentum > 0``. Its rho is each group's ``rho``
    (the paper uses a larger one than SAM's)."""


@dataclass(frozen=True)
class GSAM:
    """GSAM (Zhuang et al., ICLR 2022, arXiv 2203.08065): SAM's two passes, then the base step with
    d = g_sam - alpha * g_orth, g_orth the part of g orthogonal to g_sam. As :func:`funcsam.gsam_step`.

    Fields:
        alpha: a real >= 0, the weight of the ascent on the surrogate gap (0.2 by default; 0 is SAM).
    """

    alpha: float = 0.2

    def __post_init__(self):
        check_scalar("alpha", self.alpha)


@dataclass(frozen=True)
class AESAM:
    """AE-SAM (Jiang et al., ICLR 2023, arXiv 2304.14647): SAM's two passes where the gradient norm
    says the loss is sharp, the base step with g in one pass elsewhere. The math of
    :func:`funcsam.adaptive_sam_step` (the same rule, :func:`funcsam.policy.adaptive_statistics`)::

        step t takes SAM if take_next (True before the first step), else the base step with g
        then, with n_t = ||g_t||^2 (the plain first gradient at w, unscaled) and
        c_t = linear_threshold(min(t, total_steps), total_steps, start, end):
            mu = delta * mu + (1 - delta) * n_t          (mu = n_0, sigma^2 = 0 on the first step)
            sigma^2 = delta * sigma^2 + (1 - delta) * (n_t - mu)^2
            take_next = n_t >= mu + c_t * sigma            (a skipped, non-finite step keeps all of it)

    The optimizer keeps mean, var, count and take_next as 0-dim tensors on the parameters' device,
    updated there with ``torch.where`` on the step's finiteness, and saves them in
    ``state_dict()["funcsam"]["adaptive"]`` (``load_state_dict`` checks and restores them, so a
    resumed run is bit-exact). ``step(closure)`` reads take_next on the host once per step, before
    choosing one pass or two: free on the CPU; on a GPU a one-byte device-to-host copy that waits for
    the previous step's kernels to finish, so the GPU idles while the host launches the next step's
    first kernels (negligible next to a large model's step, visible for a tiny one). The step index
    t is ``optimizer.steps_taken`` (skipped steps count); past ``total_steps`` c_t stays at ``end``.
    Only ``step(closure)``: ``first_step``/``second_step`` are refused.

    Fields:
        total_steps: T, an int >= 1, the number of steps over which c_t moves from start to end.
        delta: the statistics' decay, in [0, 1) (the paper's 0.9).
        start, end: finite reals, c_0 and c_T (1 and -1: a high bar early, a low one late).
    """

    total_steps: int
    delta: float = 0.9
    start: float = 1.0
    end: float = -1.0

    def __post_init__(self):
        check_int("total_steps", self.total_steps, minimum=1)
        check_delta(self.delta)
        for name in ("start", "end"):
            if not is_finite_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite real number, got {getattr(self, name)!r}")

    def threshold(self, step: int) -> float:
        """c_t for the 0-based step ``step`` (``end`` from ``total_steps`` on)."""
        return linear_threshold(min(step, self.total_steps), self.total_steps, self.start, self.end)


def check_mode(mode: Any) -> Any:
    """``mode`` if it is None, :class:`LookSAM`, :class:`MSAM`, :class:`GSAM`, :class:`AESAM` or a schedule
    (``funcsam.every(k)``, ``funcsam.late(start_step)``, any object with ``takes_sam(step) -> bool``);
    TypeError otherwise."""
    if mode is None or isinstance(mode, (LookSAM, MSAM, GSAM, AESAM)):
        return mode
    examples = {LookSAM: "LookSAM(k=5, alpha=0.7)", MSAM: "MSAM()", GSAM: "GSAM(alpha=0.2)",
                AESAM: "AESAM(total_steps=10000)", Every: "funcsam.every(5)",
                every: "funcsam.every(5)", Late: "funcsam.late(1000)", late: "funcsam.late(1000)"}
    for factory, example in examples.items():
        if mode is factory:
            raise TypeError(f"mode must be a mode object, e.g. mode={example}, not {mode.__name__} itself")
    if not inspect.isclass(mode) and callable(getattr(mode, "takes_sam", None)):
        return mode
    raise TypeError(
        f"mode must be None (SAM on every step), funcsam.every(k), funcsam.late(start_step), LookSAM(k, alpha), "
        f"MSAM(), GSAM(alpha) or AESAM(total_steps), got {type(mode).__name__} {mode!r}"
    )


def takes_full_sam(mode: Any, step: int) -> bool:
    """Whether step ``step`` (0-based) of ``step(closure)`` takes SAM's two passes (MSAM: never).
    AESAM decides from the optimizer's state, not the step index: the optimizer reads its take_next."""
    if mode is None or isinstance(mode, GSAM):
        return True
    if isinstance(mode, MSAM):
        return False
    if isinstance(mode, AESAM):
        raise TypeError("AESAM decides from the optimizer's running statistics (its take_next), not from the "
                        "step index: the optimizer reads it")
    takes = (mode.schedule if isinstance(mode, LookSAM) else mode).takes_sam(step)
    if not isinstance(takes, bool):
        raise TypeError(f"mode.takes_sam(step) must return a Python bool, got {type(takes).__name__}")
    return takes


def keeps_first_gradient(mode: Any) -> bool:
    """Whether a SAM step of ``mode`` needs g after the pass at w + e (GSAM, LookSAM)."""
    return isinstance(mode, LookSAM) or (isinstance(mode, GSAM) and mode.alpha != 0)


def check_two_halves(mode: Any, method: str) -> None:
    """``first_step``/``second_step`` run SAM's two passes on every step: only SAM and GSAM do that."""
    if mode is None or isinstance(mode, GSAM):
        return
    raise RuntimeError(
        f"{method}() takes SAM's two backward passes on every step, but mode={mode!r} decides per step how many "
        "passes to take: call loss = optimizer.step(closure) instead (the closure zeroes the gradients, computes "
        "the loss, calls loss.backward() and returns the loss)"
    )


def sam_step_gradient(mode: Any, first_grads: list[Tensor] | None, sam_grads: list[Tensor],
                      eps: float) -> tuple[list[Tensor], list[Tensor] | None]:
    """``(the gradient a SAM step applies, LookSAM's new g_v or None)`` from g and g_sam (flat lists)."""
    if isinstance(mode, GSAM) and mode.alpha != 0:
        return gsam_direction(first_grads, sam_grads, mode.alpha, eps), None
    if isinstance(mode, LookSAM):
        return sam_grads, orthogonal_part(sam_grads, first_grads, eps)
    return sam_grads, None


def cheap_step_gradient(mode: Any, grads: list[Tensor], g_v: list[Tensor] | None, eps: float) -> list[Tensor]:
    """The gradient a one-pass step applies: LookSAM's estimate, or ``grads`` itself."""
    if isinstance(mode, LookSAM):
        return looksam_estimate(grads, global_norm(grads), g_v, mode.alpha, eps)
    return grads


