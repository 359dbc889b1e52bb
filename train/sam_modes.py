"""The one table of ``--sam-mode`` values: each builds the funcsam mode object that both APIs step with.

    full      None: SAM on every step                 every     funcsam.every(--sam-every, --sam-rho-scale)
    late      funcsam.late(--sam-start-epoch epochs)  looksam   funcsam.LookSAM(--sam-every, --looksam-alpha)
    msam      funcsam.MSAM()                          gsam      funcsam.GSAM(--gsam-alpha)
    adaptive  funcsam.AESAM(the run's steps, --adaptive-delta): the threshold moves over the whole run
    rst       funcsam.RST(--rst-p, seed=--seed), or with --rst-p-end p_t rising linearly over the whole run
    ksam      None: SAM on every step, on the --select-k examples of highest loss (the source funcsam.TopK,
              which train.steppers.make_source builds; the functional API only)
    sds       None: SAM on every step, the second pass on the --select-k examples whose loss rises most
              (the source funcsam.SDS, ESAM's data selection; the functional API only)
"""

from __future__ import annotations

import argparse
from typing import Callable

import funcsam

# value -> (args, steps per epoch) -> the mode (None: full SAM)
SAM_MODES: dict[str, Callable[[argparse.Namespace, int], funcsam.Mode | None]] = {
    "full": lambda args, steps_per_epoch: None,
    "every": lambda args, steps_per_epoch: funcsam.every(args.sam_every, scale_rho=args.sam_rho_scale),
    "late": lambda args, steps_per_epoch: funcsam.late(args.sam_start_epoch * steps_per_epoch),
    "looksam": lambda args, steps_per_epoch: funcsam.LookSAM(args.sam_every, args.looksam_alpha),
    "msam": lambda args, steps_per_epoch: funcsam.MSAM(),
    "gsam": lambda args, steps_per_epoch: funcsam.GSAM(args.gsam_alpha),
    "adaptive": lambda args, steps_per_epoch: funcsam.AESAM(total_steps=args.epochs * steps_per_epoch,
                                                            delta=args.adaptive_delta),
    "rst": lambda args, steps_per_epoch: funcsam.RST(
        args.rst_p, seed=args.seed, p_end=args.rst_p_end,
        total_steps=None if args.rst_p_end is None else args.epochs * steps_per_epoch),
    "ksam": lambda args, steps_per_epoch: None,
    "sds": lambda args, steps_per_epoch: None,
}


def make_mode(args: argparse.Namespace, steps_per_epoch: int) -> funcsam.Mode:
    """The mode of ``--sam-mode`` (``funcsam.FullSAM()`` for full)."""
    return funcsam.modes.check_mode(SAM_MODES[args.sam_mode](args, steps_per_epoch))
