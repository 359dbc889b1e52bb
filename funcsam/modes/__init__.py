"""SAM's modes: how a step spends its second pass. One object per mode, one file per mode, the same
objects in ``funcsam.sam_step(mode=...)``, ``funcsam.SAM``/``SAMSGD(mode=...)`` and the trainer.

    None / FullSAM()        SAM on every step (two passes)
    every(k), late(s)       SAM on the steps a schedule picks, the base step on the others
    LookSAM(k, alpha)       SAM every k steps, which measures g_v; the steps between reuse it (one pass)
    MSAM()                  one pass at w - rho * m / ||m||, m the base optimizer's momentum
    GSAM(alpha)             SAM's two passes, then d = g_sam - alpha * g_orth
    AESAM(total_steps)      SAM where ||g||^2 is high against its running statistics, the base step elsewhere
    RST(p, seed)            SAM with probability p_t (a hash of (seed, step)), the base step otherwise

:mod:`funcsam.modes.protocol` says what a mode is (its hooks and state).
"""

from .aesam import AESAM, AdaptiveState, AdaptiveStatistics, adaptive_statistics, linear_threshold
from .gsam import GSAM, gsam_direction
from .looksam import LookSAM, LookSAMState, looksam_estimate, orthogonal_part
from .msam import MSAM
from .randomized import RST, uniform_draw
from .protocol import FullSAM, Mode, StepGradients, check_mode
from .schedules import Every, Late, every, late

__all__ = [
    "AESAM", "AdaptiveState", "AdaptiveStatistics", "Every", "FullSAM", "GSAM", "Late", "LookSAM", "LookSAMState",
    "MSAM", "Mode", "RST", "StepGradients", "adaptive_statistics", "check_mode", "every", "gsam_direction", "late",
    "linear_threshold", "looksam_estimate", "orthogonal_part", "uniform_draw",
]
