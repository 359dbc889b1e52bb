"""Sharded checkpoints of the SAM optimizers with ``torch.distributed.checkpoint`` (DCP), resharding included.

``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps an optimizer's ``"state"``
and ``"param_groups"`` (``rho`` and ``adaptive`` ride in the groups) and drops everything else,
SAM's own ``state_dict()["funcsam"]`` among it: ``steps_taken`` and the mode's own state (LookSAM's
g_v per parameter, AE-SAM's statistics). It also initialises an empty optimizer state by calling
``step()`` without a closure, which SAM refuses. The two functions here take care of both::

    import torch.distributed.checkpoint as dcp
    from funcsam.checkpoint import sharded_state_dict, load_sharded_state_dict

    dcp.save(sharded_state_dict(model, optimizer), checkpoint_id=path)     # on every rank

    state = sharded_state_dict(model, optimizer)       # a fresh model and optimizer, any world size
    dcp.load(state, checkpoint_id=path)                # reshards into state's tensors in place
    load_sharded_state_dict(model, optimizer, state)

The state is ``{"model": ..., "optimizer": ..., "funcsam": {"steps_taken": tensor, <mode key>: ...}}``;
per-parameter mode state is keyed by the parameter's name (as the optimizer state is), so DCP
reshards it with the rest. It works for a ``fully_shard`` model (DTensors) and for a plain one (one
process: a checkpoint saved on N ranks loads there too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from .adapter import SAMOptimizer
from .mode_state import saved

__all__ = ["load_sharded_state_dict", "sharded_state_dict"]


def sharded_state_dict(model: torch.nn.Module, optimizer: SAMOptimizer) -> dict:
    """``{"model", "optimizer", "funcsam"}``: what ``dcp.save`` writes, or the template ``dcp.load`` fills.

    Tensors are references to the live ones (DTensor shards under FSDP2), as torch's own
    ``get_*_state_dict`` return. ``"funcsam"`` holds ``steps_taken`` (an int64 0-dim tensor, so that
    DCP loads it in place) and the mode's own state, per-parameter fields keyed by parameter name.
    """
    _check_optimizer(optimizer)
    _names(model, optimizer)  # the optimizer's params are the model's, or a message before torch's KeyError
    _initialise_state(optimizer)
    return {"model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
            "funcsam": _funcsam_by_name(model, optimizer)}


def load_sharded_state_dict(model: torch.nn.Module, optimizer: SAMOptimizer, state: dict) -> None:
    """Install what ``dcp.load`` read into a :func:`sharded_state_dict` template: the model, the
    base optimizer's state and groups, ``steps_taken`` and the mode's own state (checked as
    ``optimizer.load_state_dict`` checks them, before the optimizer changes)."""
    _check_optimizer(optimizer)
    if not isinstance(state, dict) or set(state) != {"model", "optimizer", "funcsam"}:
        got = sorted(state) if isinstance(state, dict) else f"{state!r:.80}"
        raise ValueError("state must be the dict sharded_state_dict(model, optimizer) returned, filled by dcp.load: "
                         f"keys model, optimizer, funcsam; got {got}")
    entry = _funcsam_by_index(model, optimizer, state["funcsam"])
    checked = optimizer._saved_mode_state({"funcsam": entry})
    _initialise_state(optimizer)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    optimizer._restore_mode_state(checked)


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, SAMOptimizer):
        raise TypeError(f"optimizer must be a funcsam.SAM or funcsam.SAMSGD, got {type(optimizer).__name__}; "
                        "for a torch.optim optimizer use torch.distributed.checkpoint.state_dict directly")


def _names(model: torch.nn.Module, optimizer: SAMOptimizer) -> list[str]:
    """Each of the optimizer's params' name in ``model``, in param-group order."""
    names = {p: name for name, p in model.named_parameters()}
    params = optimizer._all_params()
    missing = [i for i, p in enumerate(params) if p not in names]
    if missing:
        raise ValueError(f"{len(missing)} of the optimizer's parameters (indices {missing[:5]}) are not parameters "
                         "of model: pass the model the optimizer was built over")
    return [names[p] for p in params]


def _funcsam_by_name(model: torch.nn.Module, optimizer: SAMOptimizer) -> dict:
    """``state_dict()["funcsam"]`` with steps_taken as a tensor and per-parameter entries keyed by name."""
    mode = optimizer.mode
    entry = {"steps_taken": torch.tensor(optimizer.steps_taken, dtype=torch.int64)}
    if optimizer._mode_state is None:
        return entry
    own = saved(mode, optimizer._mode_state)
    fields = {optimizer._mode_state._fields[0]: own} if len(optimizer._mode_state._fields) == 1 else dict(own)
    names = _names(model, optimizer)
    entry[mode.checkpoint_key] = {
        field: {names[index]: tensor for index, tensor in value.items()} if field in mode.per_parameter else value
        for field, value in fields.items()
    }
    return entry


def _funcsam_by_index(model: torch.nn.Module, optimizer: SAMOptimizer, by_name: Any) -> dict:
    """:func:`_funcsam_by_name`'s form back to ``state_dict()["funcsam"]``'s (indices, an int steps_taken)."""
    steps = by_name.get("steps_taken") if isinstance(by_name, dict) else None
    if not isinstance(steps, torch.Tensor) or steps.numel() != 1:
        raise ValueError(f"state['funcsam'] must hold steps_taken, a 0-dim tensor, got {by_name!r:.200}")
    entry = {"steps_taken": int(steps)}
    mode, key = optimizer.mode, optimizer.mode.checkpoint_key
    if key is None or by_name.get(key) is None:
        return entry
    index = {name: i for i, name in enumerate(_names(model, optimizer))}
    fields = {field: {index.get(name, name): tensor for name, tensor in value.items()}
              if field in mode.per_parameter else value for field, value in by_name[key].items()}
    entry[key] = next(iter(fields.values())) if len(fields) == 1 else fields
    return entry


@torch.no_grad()
def _initialise_state(optimizer: SAMOptimizer) -> None:
    """Give an optimizer without state the state its first step would create, so that
    ``torch.distributed.checkpoint.state_dict`` does not call ``step()`` without a closure; the
    values are overwritten by the load. ``funcsam.SAM``: the base optimizer's step with zero
    gradients and lr 0, as torch does for plain optimizers; ``funcsam.SAMSGD``: zero momentum, step 0."""
    if optimizer.state:
        return
    params = optimizer._all_params()
    base = getattr(optimizer, "base_optimizer", None)
    if base is None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p]["step"] = torch.tensor(0, dtype=torch.int64, device=p.device)
                if group["momentum"] != 0:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return
    grads = [p.grad for p in params]
    lrs = [group["lr"] for group in base.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in base.param_groups:
        group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
    try:
        base.step()
    finally:
        for group, lr in zip(base.param_groups, lrs):
            group["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad
