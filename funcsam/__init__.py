"""funcsam: Sharpness-Aware Minimization on torch.func.

One pure step, :func:`sam_step`, over parameter pytrees, with any base optimizer, mode and gradient
source; the drop-in optimizers :class:`SAM` and :class:`SAMSGD` call the same mode hooks.
"""

# The pure step and its value types.
from .engine import SAMStepOutput
from .options import SAMOptions
from .step import MomentumState, init_momentum, sam_step

# Base optimizers as pure parts.
from .adam import adam_update
from .base import Adam, AdamState, SGD, adam, adamw, sgd
from .sgd import sgd_apply, sgd_direction

# Modes: how a step spends its second pass.
from . import modes
from .modes import (
    AESAM, GSAM, MSAM, RST, AdaptiveState, Every, FullSAM, Late, LookSAM, LookSAMState, Mode, every, late,
    linear_threshold,
)

# Gradient sources: one batch, micro-batches, m-sharpness parts, K-SAM's top k (replicas: SAMOptions.grad_reduce).
from .sources import SDS, MicroBatches, MSharpness, OneBatch, TopK, top_k_examples
from .batching import shard_batch, split_batch

# The named steps: sam_step with one mode or source.
from .named_steps import (
    accumulated_sam_step, adaptive_sam_step, gsam_step, init_adaptive, init_looksam, looksam_step,
    m_sharpness_sam_step, msam_step, scheduled_sam_step,
)

# The drop-in optimizers.
from .adapter import SAMOptimizer
from .optimizer import SAM, SAMSGD

# Building blocks: loss functions, perturbation, clipping, fp16 loss scaling, reductions.
from .loss import make_loss_fn
from .perturbation import ascent_direction, perturbation_and_norm, sam_perturbation
from .clipping import clip_by_global_norm
from .loss_scale import LossScaleState, init_loss_scale, update_loss_scale
from .tree import global_norm

# SAM-ON, data parallelism and the sharpness meter.
from . import distributed, sam_on
from .sam_on import norm_layer_mask, sam_on_param_groups
from .sharpness import HessianEigenvalue, HessianTrace, hessian_trace, top_hessian_eigenvalue

__version__ = "0.1.0"

__all__ = [
    "SAMOptions", "SAMStepOutput", "MomentumState", "init_momentum", "sam_step",
    "Adam", "AdamState", "SGD", "adam", "adam_update", "adamw", "sgd", "sgd_apply", "sgd_direction",
    "modes", "AESAM", "AdaptiveState", "Every", "FullSAM", "GSAM", "Late", "LookSAM", "LookSAMState", "MSAM", "Mode",
    "RST", "every", "late", "linear_threshold",
    "MicroBatches", "MSharpness", "OneBatch", "SDS", "TopK", "shard_batch", "split_batch", "top_k_examples",
    "accumulated_sam_step", "adaptive_sam_step", "gsam_step", "init_adaptive", "init_looksam", "looksam_step",
    "m_sharpness_sam_step", "msam_step", "scheduled_sam_step",
    "SAM", "SAMOptimizer", "SAMSGD",
    "make_loss_fn", "ascent_direction", "perturbation_and_norm", "sam_perturbation", "clip_by_global_norm",
    "LossScaleState", "init_loss_scale", "update_loss_scale", "global_norm",
    "distributed", "sam_on", "norm_layer_mask", "sam_on_param_groups",
    "HessianEigenvalue", "HessianTrace", "hessian_trace", "top_hessian_eigenvalue",
]
