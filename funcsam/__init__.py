"""funcsam: Sharpness-Aware Minimization on torch.func.

The pure step :func:`sam_step` over parameter pytrees with any base optimizer (:func:`sgd`,
:func:`adam`, :func:`adamw`), and :class:`SAMSGD`, a drop-in ``torch.optim.Optimizer`` computing the
same step with a closure.
"""

from .adam import adam_update
from .base import Adam, AdamState, SGD, adam, adamw, sgd
from .clipping import clip_by_global_norm
from .loss import make_loss_fn
from .loss_scale import LossScaleState, init_loss_scale, update_loss_scale
from .adapter import SAMOptimizer
from .optimizer import SAM, SAMSGD
from .perturbation import ascent_direction, perturbation_and_norm, sam_perturbation
from .sgd import sgd_apply, sgd_direction
from .step import MomentumState, SAMStepOutput, init_momentum, sam_step
from .tree import global_norm

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamState",
    "SGD",
    "adam",
    "adam_update",
    "adamw",
    "sgd",
    "LossScaleState",
    "MomentumState",
    "SAM",
    "SAMOptimizer",
    "SAMSGD",
    "SAMStepOutput",
    "ascent_direction",
    "clip_by_global_norm",
    "global_norm",
    "init_loss_scale",
    "init_momentum",
    "make_loss_fn",
    "perturbation_and_norm",
    "sam_perturbation",
    "sam_step",
    "sgd_apply",
    "sgd_direction",
    "update_loss_scale",
]

# Issue 4: data parallelism, m-sharpness and gradient accumulation.
from . import distributed
from .accumulate import accumulated_sam_step
from .batching import shard_batch, split_batch
from .msharpness import m_sharpness_sam_step

__all__ += ["accumulated_sam_step", "distributed", "m_sharpness_sam_step", "shard_batch", "split_batch"]

# Issue 10: a sharpness meter.
from .sharpness import HessianEigenvalue, HessianTrace, hessian_trace, top_hessian_eigenvalue

__all__ += ["HessianEigenvalue", "HessianTrace", "hessian_trace", "top_hessian_eigenvalue"]

# Issue 10: cheaper SAM modes.
from .modes import (
    Every, Late, LookSAMState, every, gsam_step, init_looksam, late, looksam_step, msam_step, scheduled_sam_step,
)

__all__ += ["Every", "Late", "LookSAMState", "every", "gsam_step", "init_looksam", "late", "looksam_step", "msam_step",
            "scheduled_sam_step"]
from .policy import AdaptiveState, adaptive_sam_step, init_adaptive, linear_threshold
from .sam_on import norm_layer_mask, sam_on_param_groups

__all__ += ["AdaptiveState", "adaptive_sam_step", "init_adaptive", "linear_threshold", "norm_layer_mask",
            "sam_on_param_groups"]
from .adapter_modes import AESAM, GSAM, MSAM, LookSAM

__all__ += ["AESAM", "GSAM", "LookSAM", "MSAM"]
