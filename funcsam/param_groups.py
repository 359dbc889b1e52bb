"""The stateful optimizers' param groups: SAM's options checked, the params with a gradient found and named.

Each group holds, besides the base optimizer's hyperparameters, ``rho`` (a real >= 0 or a 0-dim
tensor), ``adaptive`` (ASAM) and, for SAM-ON, ``perturb`` (:mod:`funcsam.two_halves`). A step works
on the params that have a gradient, group by group, as ``[(group, [params]), ...]``.
"""

from __future__ import annotations

import weakref

import torch

from .hyperparameters import check_scalar
from .modes.protocol import Mode

__all__ = ["all_params", "check_group", "check_group_fits_mode", "described", "gradients_seen", "has_new_gradient",
           "positions", "with_gradients"]


def check_group(group: dict) -> None:
    """TypeError or ValueError naming a bad ``rho``, ``lr`` or ``adaptive`` of ``group``."""
    check_scalar("rho", group.get("rho"), allow_tensor=True)
    if "lr" in group:
        check_scalar("lr", group["lr"], allow_tensor=True)
    if not isinstance(group.get("adaptive", False), bool):
        raise TypeError(f"adaptive must be a bool, got {group['adaptive']!r}")


def check_group_fits_mode(mode: Mode, group: dict, where: str) -> None:
    """``mode.check_momentum`` for a group whose ``momentum`` hyperparameter says whether it has one."""
    if "momentum" in group:
        mode.check_momentum(group["momentum"] != 0, f"{where} with momentum={group['momentum']}")


def all_params(param_groups: list) -> list:
    """Every parameter, in param-group order (the indices of ``state_dict()["state"]``)."""
    return [p for group in param_groups for p in group["params"]]


def positions(param_groups: list, params: list) -> list[int]:
    """Where each of ``params`` sits in :func:`all_params`."""
    index = {p: i for i, p in enumerate(all_params(param_groups))}
    return [index[p] for p in params]


def with_gradients(param_groups: list, where: str) -> list:
    """``[(group, [its params with a gradient])]`` over the groups that have any; RuntimeError if none has."""
    groups = [(group, [p for p in group["params"] if p.grad is not None]) for group in param_groups]
    groups = [(group, params) for group, params in groups if params]
    if not groups:
        raise RuntimeError(
            f"no parameter has a gradient after {where}: call loss.backward() (or "
            "grad_scaler.scale(loss).backward()) so that SAM has a gradient to perturb with"
        )
    return groups


def gradients_seen(params: list) -> dict:
    """What :func:`has_new_gradient` compares with: each ``p.grad`` as a step left it (identity, version)."""
    return {p: (weakref.ref(p.grad), p.grad._version) for p in params}


def has_new_gradient(param_groups: list, seen: dict) -> bool:
    """Whether some ``p.grad`` was written since ``seen`` (:func:`gradients_seen`): new, or changed in place."""
    for group in param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            last = seen.get(p)
            if last is None or last[0]() is not p.grad or last[1] != p.grad._version:
                return True
    return False


def described(params: list, param_groups: list, model: torch.nn.Module | None, shown: int = 3) -> str:
    """The first ``shown`` of ``params`` by name (``model``'s, if given; else "param group G, index I")
    and shape, for messages."""
    names = {p: name for name, p in model.named_parameters()} if model is not None else {}
    where = {p: f"param group {g}, index {i}" for g, group in enumerate(param_groups)
             for i, p in enumerate(group["params"])}
    parts = [f"{names.get(p) or where.get(p, '?')} of shape {tuple(p.shape)}" for p in params[:shown]]
    return ", ".join(parts) + (", ..." if len(params) > shown else "")
