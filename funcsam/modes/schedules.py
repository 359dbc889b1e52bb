"""Schedules: SAM on the steps a host-side rule picks, the base step (one pass) on the others.

    every(k)            SAM on steps 0, k, 2k, ...  (Composer's ``interval``): (1 + 1/k) passes a step
    every(k, scale_rho=True)   the same, each SAM step perturbing with rho * k (Composer's advice for
                        intervals: rho 0.5 at interval 10 on ImageNet, ten times SAM's usual 0.05)
    late(start_step)    the base step before start_step, SAM from it on: late-phase SAM
                        (Zhou et al. 2024, arXiv 2410.10373)

The decision is a Python bool made on the host (``mode.takes_sam(step)``), so a compiled step keeps
exactly two graphs (the SAM step and the base step), whatever lr and rho do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..hyperparameters import check_int
from .protocol import Mode, check_step

__all__ = ["Every", "Late", "every", "late"]


@dataclass(frozen=True)
class Every(Mode):
    """SAM on steps 0, k, 2k, ... and the base step on the others; ``Every(1)`` is SAM on every
    step. With ``scale_rho`` the SAM steps perturb with rho * k (e = rho * k * g / (||g|| + eps)):
    one SAM step in k makes up for the k - 1 base steps with a k times larger neighbourhood. Build it
    with :func:`every`."""

    k: int
    scale_rho: bool = False

    two_halves = False  # schedules decide per step how many passes to take
    example = "funcsam.every(5)"

    def __post_init__(self):
        check_int("k", self.k, minimum=1, meaning="SAM runs on steps 0, k, 2k, ...; k=1 is SAM on every step")
        if not isinstance(self.scale_rho, bool):
            raise TypeError(f"scale_rho must be a bool (True: SAM steps perturb with rho * k), got {self.scale_rho!r}")

    @property
    def rho_scale(self) -> float:
        """k where ``scale_rho``, else 1: the factor on rho of every SAM step."""
        return float(self.k) if self.scale_rho else 1.0

    def takes_sam(self, step: int, state: Any = None) -> bool:
        """Whether step ``step`` (0-based) takes the SAM gradient."""
        check_step(step)
        return step % self.k == 0


@dataclass(frozen=True)
class Late(Mode):
    """The base step before ``start_step``, SAM from it on; ``Late(0)`` is SAM on every step.
    Build it with :func:`late`."""

    start_step: int

    two_halves = False
    example = "funcsam.late(1000)"

    def __post_init__(self):
        check_int("start_step", self.start_step, minimum=0, meaning="the first (0-based) step that takes SAM")

    def takes_sam(self, step: int, state: Any = None) -> bool:
        """Whether step ``step`` (0-based) takes the SAM gradient."""
        check_step(step)
        return step >= self.start_step


def every(k: int, scale_rho: bool = False) -> Every:
    """SAM every ``k`` steps (steps 0, k, 2k, ...), the base step between. ``k`` is an int >= 1;
    ``scale_rho=True`` perturbs each SAM step with rho * k (Composer: rho 0.5 at interval 10)."""
    return Every(k, scale_rho)


def late(start_step: int) -> Late:
    """The base step on steps 0 .. start_step - 1, SAM from ``start_step`` on. An int >= 0."""
    return Late(start_step)
