"""Dynamic loss scaling for fp16, as a pure state transition (what torch.amp.GradScaler does, minus
the hidden state and the host syncs).

The loss is multiplied by ``scale`` before differentiation and the gradients are divided by it after.
For SAM both passes are scaled with the same scale, and the first gradient is unscaled before its
norm is taken. After a step:

    non-finite gradient (either pass):  scale <- scale * backoff_factor, tracker <- 0, step skipped
    finite:                             tracker <- tracker + 1;
                                        if tracker == growth_interval: scale <- scale * growth_factor, tracker <- 0

The defaults are GradScaler's: init_scale 2**16, growth_factor 2, backoff_factor 0.5, growth_interval 2000.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .tree import Tensor


class LossScaleState(NamedTuple):
    """State of dynamic loss scaling; every field is a 0-dim tensor so that it compiles as data.

    Fields:
        scale: fp32, the factor the loss is multiplied by.
        growth_tracker: int32, consecutive finite steps since the scale last changed.
        growth_factor: fp32, the scale's factor after ``growth_interval`` finite steps.
        backoff_factor: fp32, the scale's factor after a non-finite step.
        growth_interval: int32, finite steps needed before the scale grows.
    """

    scale: Tensor
    growth_tracker: Tensor
    growth_factor: Tensor
    backoff_factor: Tensor
    growth_interval: Tensor


def init_loss_scale(
    init_scale: float = 2.0**16,
    *,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    device: torch.device | str | None = None,
) -> LossScaleState:
    """A fresh :class:`LossScaleState`; pass it as ``sam_step(..., loss_scale=state)``."""
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale}")
    if not growth_factor > 1:
        raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
    if not 0 < backoff_factor < 1:
        raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
    if not (isinstance(growth_interval, int) and growth_interval > 0):
        raise ValueError(f"growth_interval must be a positive int, got {growth_interval!r}")
    f32 = dict(dtype=torch.float32, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    return LossScaleState(
        scale=torch.tensor(init_scale, **f32),
        growth_tracker=torch.tensor(0, **i32),
        growth_factor=torch.tensor(growth_factor, **f32),
        backoff_factor=torch.tensor(backoff_factor, **f32),
        growth_interval=torch.tensor(growth_interval, **i32),
    )


def update_loss_scale(state: LossScaleState, finite: Tensor) -> LossScaleState:
    """The state after a step whose gradients were ``finite`` (0-dim bool). Pure."""
    tracker = torch.where(finite, state.growth_tracker + 1, torch.zeros_like(state.growth_tracker))
    grow = tracker >= state.growth_interval
    scale = torch.where(
        finite,
        torch.where(grow, state.scale * state.growth_factor, state.scale),
        state.scale * state.backoff_factor,
    )
    tracker = torch.where(grow, torch.zeros_like(tracker), tracker)
    # Built field by field rather than with ``_replace``: compiled by torch 2.11, ``_replace`` returns a
    # malformed tuple that the next compiled call cannot read.
    return LossScaleState(
        scale=scale,
        growth_tracker=tracker,
        growth_factor=state.growth_factor,
        backoff_factor=state.backoff_factor,
        growth_interval=state.growth_interval,
    )
