"""Sharded parameters (FSDP2's ``fully_shard``, DTensor): reductions global over the mesh, math on shards.

Under ``torch.distributed.fsdp.fully_shard`` every parameter, gradient and optimizer state tensor is a
DTensor whose rank-local part (``to_local()``) is a slice of the whole. The stateful optimizers
(:class:`funcsam.SAM`, :class:`funcsam.SAMSGD`) run their foreach math on those local parts (plain
tensors: DTensor has no sharding strategy for some foreach ops, ``_foreach_copy_`` among them) and
take every reduction over the parameter tree (:func:`funcsam.tree.global_norm`, :func:`funcsam.tree.dot`)
globally, with one all-reduce of one scalar per reduction::

    ||x||^2  = sum over the shard groups of (sum_i ||local(x_i)||^2)      one all_reduce(SUM)
    x . y    = sum over the shard groups of (sum_i <local(x_i), local(y_i)>)

A mesh dimension whose placement is ``Shard`` is summed over; a ``Replicate`` one is not (HSDP's
replicas hold the same shard). Two ways in:

* DTensor leaves given to ``global_norm``/``dot`` are recognised by their placements.
* Inside ``with over_shards(layout):`` every plain leaf is taken to be such a local part of a tensor
  sharded as ``layout`` says (:func:`layout_of` reads it from the optimizer's params): the optimizers'
  leaf lists are local views, and the modes compute derived lists (GSAM's g_orth, LookSAM's g_v) from
  them, which keep no placement of their own.

Outside both, nothing here runs and the one-process path is unchanged bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist

Tensor = torch.Tensor

__all__ = ["ShardLayout", "check_sharded_alike", "check_state_sharding", "is_dtensor", "layout_of", "local_views",
           "over_shards", "params_layout", "reduced_sum", "refuse_fsdp1", "stored_into", "uses_shards"]


class ShardLayout(NamedTuple):
    """How the local parts of sharded tensors add up to the whole.

    Fields:
        groups: the process groups to sum a local partial sum over, one per mesh dimension with a
            ``Shard`` placement (FSDP2 on a 1-D mesh: one group, the mesh's).
        description: the mesh and placements, for messages.
    """

    groups: tuple
    description: str


_CURRENT: contextvars.ContextVar[ShardLayout | None] = contextvars.ContextVar("funcsam_shard_layout", default=None)


@functools.cache
def _dtensor_type():
    """``DTensor``, imported on first use (``import funcsam`` does not load torch.distributed.tensor)."""
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_views(tensors: Sequence) -> list:
    """Each DTensor's rank-local part (the tensor itself, writes go through), other tensors as they are."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]


def stored_into(old: Tensor, new: Tensor) -> Tensor:
    """``new`` written into a DTensor ``old``'s local part (returning ``old``, so that the state keeps
    its DTensor and distributed checkpointing can reshard it); ``new`` itself when ``old`` is plain."""
    if not is_dtensor(old):
        return new
    old.to_local().copy_(new)
    return old


def layout_of(tensor: Tensor) -> ShardLayout:
    """The :class:`ShardLayout` of a DTensor, from its mesh and placements; ValueError for a
    ``Partial`` placement (a pending sum: the local parts are no slices of the whole)."""
    mesh, placements = tensor.device_mesh, tensor.placements
    if any(placement.is_partial() for placement in placements):
        raise ValueError(f"a DTensor with placements {placements} holds a pending sum (Partial), not shards: "
                         "redistribute it to Shard or Replicate before a SAM step")
    groups = tuple(mesh.get_group(dim) for dim, placement in enumerate(placements) if placement.is_shard())
    return ShardLayout(groups, f"mesh {tuple(mesh.shape)} with placements {tuple(placements)}")


def params_layout(params: Sequence[Tensor]) -> ShardLayout | None:
    """The one layout of ``params`` if they are DTensors (None if none is); ValueError naming the mix
    if only some are, or if they are sharded over different meshes or placements."""
    sharded = [p for p in params if is_dtensor(p)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError(
            f"{len(sharded)} of the optimizer's {len(params)} parameters are sharded (DTensors from fully_shard) and "
            "the others are plain tensors: the norms SAM takes would count the plain ones once per rank. Apply "
            "torch.distributed.fsdp.fully_shard to every module whose parameters the optimizer holds (the root last)")
    layouts = {}
    for p in sharded:
        layout = layout_of(p)
        layouts.setdefault(tuple(id(group) for group in layout.groups), layout)
    if len(layouts) != 1:
        raise ValueError("the optimizer's parameters are sharded over different meshes or placements "
                         f"({'; '.join(layout.description for layout in layouts.values())}): give them one mesh")
    return next(iter(layouts.values()))


def refuse_fsdp1(model, params: Sequence[Tensor]) -> None:
    """TypeError if ``model`` is (or holds) an FSDP1 ``FullyShardedDataParallel`` module or a param is one
    of its flattened shards: their norms would be per rank, not global. FSDP2 is the supported way."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = model is not None and any(isinstance(module, FullyShardedDataParallel) for module in model.modules())
    # FSDP1 marks its flat parameters and, with use_orig_params=True, the views into them.
    flattened = any(getattr(p, "_fsdp_flattened", False) for p in params)
    if wrapped or flattened:
        raise TypeError(
            "these parameters come from torch.distributed.fsdp.FullyShardedDataParallel (FSDP1), whose flat shards "
            "are plain tensors: SAM's gradient norm would be each rank's own, not the global one. Shard the model "
            "with FSDP2 instead, torch.distributed.fsdp.fully_shard(module) on each block and then the root, and "
            "build the optimizer over model.parameters() after it (docs: Sharded training: FSDP2)")


def check_state_sharding(state_dict, params: Sequence[Tensor]) -> None:
    """ValueError if a per-parameter tensor of an optimizer ``state_dict`` is not sharded as its
    parameter is (a plain ``optimizer.state_dict()`` of DTensor state, loaded with plain params or on
    another mesh size, or plain state loaded with sharded params): torch.optim would load it as it is
    and fail, or compute with the wrong shard, later. Checked before anything is loaded."""
    state = state_dict.get("state", {}) if isinstance(state_dict, dict) else {}
    for index, values in state.items():
        param = params[index] if isinstance(index, int) and 0 <= index < len(params) else None
        if param is None or not isinstance(values, dict):
            continue
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                check_sharded_alike(value, param, f"state_dict['state'][{index}][{key!r}]")


def check_sharded_alike(value: Tensor, param: Tensor, name: str) -> None:
    def described(t: Tensor) -> str:
        if not is_dtensor(t):
            return "a plain tensor"
        return f"a DTensor over a mesh of {t.device_mesh.size()} rank(s) with placements {tuple(t.placements)}"

    same = is_dtensor(value) == is_dtensor(param) and (not is_dtensor(value) or (
        value.device_mesh.size() == param.device_mesh.size() and tuple(value.placements) == tuple(param.placements)))
    if not same:
        raise ValueError(
            f"{name} is {described(value)}, its parameter {described(param)}: a plain optimizer.state_dict() "
            "of sharded (FSDP2) state loads only where the parameters are sharded the same way. To resume on "
            "another world size, save and load with torch.distributed.checkpoint, which reshards: "
            "funcsam.checkpoint.sharded_state_dict / load_sharded_state_dict (nothing was loaded)")


@contextlib.contextmanager
def over_shards(layout: ShardLayout | None) -> Iterator[None]:
    """Within it, plain leaves given to the reductions are local parts laid out as ``layout`` (None:
    no change, the one-process path)."""
    if layout is None:
        yield
        return
    token = _CURRENT.set(layout)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def uses_shards(leaves: Sequence) -> bool:
    """Whether a reduction over ``leaves`` must go through :func:`reduced_sum` (a DTensor among them,
    or inside :func:`over_shards`); always False under torch.compile, where neither occurs."""
    if torch.compiler.is_compiling():
        return False
    return _CURRENT.get() is not None or any(is_dtensor(leaf) for leaf in leaves)


def reduced_sum(leaves: Sequence, partial_sums: Sequence[Tensor]) -> Tensor:
    """sum_i partial_sums[i], where partial_sums[i] is leaf i's local contribution, summed over the
    shard groups of each leaf's layout: one all_reduce of one scalar per group (one in all for FSDP2).

    ``partial_sums`` are 0-dim tensors of one dtype (or vectors of one length: several sums in one
    all-reduce). Leaves that are neither DTensors nor inside :func:`over_shards` count once (they are
    whole on every rank).
    """
    current = _CURRENT.get()
    by_layout: dict[tuple, list] = {}
    for leaf, partial in zip(leaves, partial_sums):
        layout = layout_of(leaf) if is_dtensor(leaf) else current
        groups = () if layout is None else layout.groups
        by_layout.setdefault(tuple(groups), []).append(partial)
    total = None
    for groups, parts in by_layout.items():
        summed = torch.stack(parts).sum(0)
        for group in groups:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        total = summed if total is None else total + summed
    return torch.zeros(()) if total is None else total
