"""The SAM-side options of a step, as one value shared by every step and mode.

The base optimizer's hyperparameters live in the base (``funcsam.sgd(momentum=0.9)``), the per-step
schedules (lr, rho) are arguments, and per-step state (the fp16 loss scale) travels as state: what
is left is how the perturbation is taken, clipped and synchronised::

    options = funcsam.SAMOptions(adaptive=True, eta=0.01, max_grad_norm=1.0)
    out = funcsam.sam_step(params, buffers, batch, loss_fn, rho, lr, state, options=options)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .hyperparameters import check_sam_options

GradReduce = Callable[[list], list]

__all__ = ["GradReduce", "SAMOptions", "check_options"]


class SAMOptions(NamedTuple):
    """How a SAM step perturbs, clips and synchronises (every field has a default).

    Fields:
        adaptive: ASAM's scale-invariant perturbation, e = rho * T^2 g / (||T g||_2 + eps), T = |w| + eta.
        eta: ASAM's offset, a real >= 0.
        eps: added to the gradient norm, > 0; a zero gradient gives e = 0 (never NaN).
        max_grad_norm: if given, the gradient the base optimizer applies is clipped to this global
            norm (the official implementation's placement, after the pass at w + e). None: no clipping.
        grad_reduce: a function on the flat gradient list, e.g. the data-parallel all-reduce mean
            :func:`funcsam.distributed.all_reduce_mean`. None: one process.
        sam_sync: ``"global"`` (perturb with the reduced gradient: one process on the global batch)
            or ``"local"`` (each replica perturbs with its own gradient, m-sharpness with m = the
            per-replica batch). Only matters with ``grad_reduce``.
        perturb_mask: SAM-ON (:mod:`funcsam.sam_on`): a pytree of Python bools shaped like params,
            e.g. ``funcsam.sam_on.norm_layer_mask(model)``; only True leaves are perturbed and normed,
            every leaf descends. None perturbs every leaf.
    """

    adaptive: bool = False
    eta: float = 0.0
    eps: float = 1e-12
    max_grad_norm: float | None = None
    grad_reduce: GradReduce | None = None
    sam_sync: str = "global"
    perturb_mask: object = None


def check_options(options: SAMOptions) -> SAMOptions:
    """``options`` if every field is valid; TypeError or ValueError naming the first bad field."""
    if not isinstance(options, SAMOptions):
        raise TypeError(f"options must be a funcsam.SAMOptions(...), got {type(options).__name__} {options!r:.80}")
    if not isinstance(options.adaptive, bool):
        raise TypeError(f"adaptive must be a bool, got {options.adaptive!r}")
    check_sam_options(eta=options.eta, eps=options.eps, max_grad_norm=options.max_grad_norm)
    if options.sam_sync not in ("global", "local"):
        raise ValueError(f"sam_sync must be 'global' or 'local', got {options.sam_sync!r}")
    if options.grad_reduce is not None and not callable(options.grad_reduce):
        raise TypeError(f"grad_reduce must be a function list[Tensor] -> list[Tensor] or None, got {options.grad_reduce!r}")
    if isinstance(options.perturb_mask, torch.Tensor):
        raise TypeError("perturb_mask must be a pytree of Python bools shaped like params "
                        "(funcsam.sam_on.norm_layer_mask(model)), not a tensor")
    return options
