"""A mode's own state in the stateful optimizers: kept over every parameter, saved in checkpoints.

The own state is what ``mode.init(params)`` builds (:mod:`funcsam.modes.protocol`): None, or a
NamedTuple whose ``mode.per_parameter`` fields hold one tensor per parameter (LookSAM's g_v) and whose
other fields are tensors of their own (AE-SAM's 0-dim statistics). :class:`funcsam.SAMOptimizer` keeps
it over all its parameters, in param-group order, and hands the hooks the entries of the parameters
that have a gradient this step::

    own   = mode.init(params)                       at construction; extended(...) for an added group
    part  = gather(mode, own, indices)              the entries of params[i] for i in indices
    own   = scatter(mode, own, indices, part)       the hooks' result written back
    entry = saved(own)                              state_dict()["funcsam"][mode.checkpoint_key]
    own   = restored(mode, entry, params)           load_state_dict, checked before anything changes

In a checkpoint a per-parameter field is ``{parameter index: tensor}`` (the indices of
``state_dict()["state"]``; a missing index starts fresh), any other field its tensor, and the entry
``{field: value}``, or the value itself for a state of one field (``"looksam_g_v": {index: tensor}``).
"""

from __future__ import annotations

from typing import Any

import torch

from .modes.protocol import Mode
from .sharding import check_sharded_alike, local_views, stored_into

__all__ = ["checked_funcsam_entry", "extended", "funcsam_entry", "gather", "restored", "saved", "scatter"]


def gather(mode: Mode, own: Any, indices: list[int] | None) -> Any:
    """``own`` with its per-parameter fields cut to the entries ``indices`` (None: all of them); of a
    sharded (DTensor) entry, its local part, which the hooks' foreach math runs on."""
    if own is None or indices is None or not mode.per_parameter:
        return own
    return own._replace(**{field: local_views([getattr(own, field)[i] for i in indices])
                           for field in mode.per_parameter})


def scatter(mode: Mode, own: Any, indices: list[int] | None, part: Any) -> Any:
    """``part`` (a :func:`gather` of ``own``, updated) with its per-parameter entries written back over
    ``own``'s (into a sharded entry's local part: it stays a DTensor)."""
    if part is None or indices is None or not mode.per_parameter:
        return part
    fields = {}
    for field in mode.per_parameter:
        whole = list(getattr(own, field))
        for index, value in zip(indices, getattr(part, field)):
            whole[index] = stored_into(whole[index], value)
        fields[field] = whole
    return part._replace(**fields)


def extended(mode: Mode, own: Any, new_params: list) -> Any:
    """``own`` with fresh entries for ``new_params`` (a param group added after it was built)."""
    if own is None or not mode.per_parameter:
        return own
    fresh = mode.init(new_params)
    return own._replace(**{field: list(getattr(own, field)) + list(getattr(fresh, field))
                           for field in mode.per_parameter})


def funcsam_entry(mode: Mode, steps_taken: int, own: Any) -> dict:
    """``state_dict()["funcsam"]``: ``{"steps_taken": int, mode.checkpoint_key: saved(mode, own)}``
    (no second key for a mode without own state)."""
    entry = {"steps_taken": steps_taken}
    if own is not None:
        entry[mode.checkpoint_key] = saved(mode, own)
    return entry


def checked_funcsam_entry(mode: Mode, state_dict: Any, params: list) -> tuple[int, Any]:
    """``(steps_taken, own state)`` from an optimizer state dict, checked before anything is loaded
    (ValueError naming the entry). A state dict without ``"funcsam"`` (from torch.optim) starts over at
    step 0, and one without the mode's key (another mode's) with a fresh own state; the entries of
    other modes are ignored."""
    entry = state_dict.get("funcsam") if isinstance(state_dict, dict) else None
    if entry is None:
        return 0, mode.init(params)
    steps = entry.get("steps_taken") if isinstance(entry, dict) else None
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"state_dict['funcsam'] must hold steps_taken, an int >= 0 (from optimizer.state_dict()), "
                         f"got {entry!r:.200}")
    if mode.own_type is None or entry.get(mode.checkpoint_key) is None:
        return steps, mode.init(params)
    return steps, restored(mode, entry[mode.checkpoint_key], params)


def saved(mode: Mode, own: Any) -> Any:
    """The checkpoint entry of ``own`` (module docstring): references, as torch.optim's state_dict holds."""
    entry = {field: dict(enumerate(value)) if field in mode.per_parameter else value
             for field, value in zip(own._fields, own)}
    return entry[own._fields[0]] if len(own._fields) == 1 else entry


def restored(mode: Mode, entry: Any, params: list) -> Any:
    """The own state a checkpoint ``entry`` holds, on the parameters' devices; ValueError naming the
    entry if it is not what :func:`saved` writes for ``mode`` over ``params`` (or no state a run can have).

    Per-parameter tensors need their parameter's shape and take its device and dtype (as torch.optim's
    state does); the other fields need the dtype and shape ``mode.init`` gives them."""
    fresh = mode.init(params)
    fields = fresh._fields
    name = f"state_dict['funcsam'][{mode.checkpoint_key!r}]"
    values = {fields[0]: entry} if len(fields) == 1 else entry
    if not isinstance(values, dict) or set(values) != set(fields):
        raise ValueError(f"{name} must hold {mode!r}'s own state as optimizer.state_dict() writes it "
                         f"({_described(mode, fresh)}); got {entry!r:.200}")
    own = fresh._replace(**{
        field: _restored_per_parameter(values[field], getattr(fresh, field), params, name)
        if field in mode.per_parameter else _restored_tensor(values[field], getattr(fresh, field), field, name)
        for field in fields
    })
    problem = mode.own_state_problem(own)
    if problem is not None:
        raise ValueError(f"{name} holds no state a run of {mode!r} can have: {problem}; got {entry!r:.200}")
    return own


def _restored_per_parameter(value: Any, fresh: list, params: list, name: str) -> list:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must map parameter indices to tensors, got {type(value).__name__}")
    restored = list(fresh)
    for index, tensor in value.items():
        fits = isinstance(index, int) and 0 <= index < len(params) and isinstance(tensor, torch.Tensor)
        if not fits or tensor.shape != params[index].shape:
            raise ValueError(f"{name} entry {index!r} does not fit a parameter of this optimizer: the state "
                             "belongs to another model")
        check_sharded_alike(tensor, params[index], f"{name}[{index}]")
        restored[index] = tensor.to(device=params[index].device, dtype=params[index].dtype, copy=True)
    return restored


def _restored_tensor(value: Any, fresh: torch.Tensor, field: str, name: str) -> torch.Tensor:
    if not (isinstance(value, torch.Tensor) and value.dtype == fresh.dtype and value.shape == fresh.shape):
        got = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:80]
        raise ValueError(f"{name}[{field!r}] must be a {fresh.dtype} tensor of shape {tuple(fresh.shape)}, got {got}")
    return value.to(device=fresh.device, copy=True)


def _described(mode: Mode, fresh: Any) -> str:
    return ", ".join(f"{field}: {{parameter index: tensor}}" if field in mode.per_parameter
                     else f"{field}: {value.dtype} of shape {tuple(value.shape)}"
                     for field, value in zip(fresh._fields, fresh))
