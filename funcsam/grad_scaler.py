"""torch.amp.GradScaler in the stateful optimizers: unscale SAM's gradients, tell the scaler the verdict.

``GradScaler.step`` refuses closures and reads the verdict on the host, so the optimizers take the
scaler as an argument (``optimizer.step(closure, grad_scaler=scaler)``) and do its two jobs themselves::

    g      <- p.grad * (1 / scale)          in place, before any norm (both passes; as GradScaler.unscale_)
    found_inf = not finite                  left in the scaler, so that scaler.update() backs off or grows

The caller still calls ``scaler.update()`` after the step, as with any optimizer.
"""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState

from .sharding import local_views
from .tree import Tensor

__all__ = ["inverse_scale", "record_found_inf", "unscaled_grads"]


def inverse_scale(grad_scaler: torch.amp.GradScaler | None) -> Tensor | None:
    """1 / scale of an enabled ``grad_scaler`` (computed in fp64, as GradScaler does), else None."""
    if grad_scaler is None:
        return None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler or None, got {type(grad_scaler).__name__} "
                        f"{grad_scaler!r}")
    if not grad_scaler.is_enabled():
        return None
    scale = grad_scaler._scale
    if scale is None:
        raise RuntimeError(
            "grad_scaler has not scaled a loss yet: call grad_scaler.scale(loss).backward() before the step"
        )
    return scale.double().reciprocal().float()


def unscaled_grads(params: list, inverse: Tensor | None) -> list:
    """``[p.grad for p in params]`` (their local parts when sharded, :mod:`funcsam.sharding`),
    multiplied in place by ``inverse`` when given: p.grad then holds the true gradient, as after
    ``GradScaler.unscale_``."""
    grads = local_views([p.grad for p in params])
    if inverse is not None:
        torch._foreach_mul_(grads, inverse)
    return grads


def record_found_inf(grad_scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer,
                     finite: Tensor) -> None:
    """Leave in an enabled ``grad_scaler`` what its own ``unscale_``/``step`` would, so ``update()``
    works as usual (no host sync: the verdict stays a tensor)."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return
    state = grad_scaler._per_optimizer_states[id(optimizer)]
    found_inf = (~finite).to(torch.float32)
    state["found_inf_per_device"] = {found_inf.device: found_inf}
    state["stage"] = OptState.STEPPED
