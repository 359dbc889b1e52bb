"""Pytree plumbing and the reductions over it: flatten once at the boundary, math on flat leaf lists.

Every reduction over the parameter tree that funcsam takes (||g||, ASAM's ||T g||, g . g_sam,
the clipping norm, the finite verdict) goes through :func:`global_norm` and :func:`dot`, the one
place the sharded version changes: with DTensor leaves, or the local parts of sharded tensors inside
:func:`funcsam.sharding.over_shards`, each sums its local part and all-reduces that one scalar
(:mod:`funcsam.sharding`).

optree orders dict leaves by sorted key, so the treespec returned by :func:`flatten` is the one source
of truth for leaf order; never zip leaves with ``module.parameters()``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import optree
import torch

from . import sharding

Tensor = torch.Tensor
PyTree = Any


# Dynamo cannot trace optree over an empty dict (a model without buffers passes ``{}``), so the
# empty dict is flattened here by hand, with the spec optree would give it.
_EMPTY_DICT_SPEC = optree.tree_structure({})


def flatten(tree: PyTree) -> tuple[list[Tensor], optree.PyTreeSpec]:
    """Leaves of ``tree`` in optree order, and the spec that rebuilds it."""
    if type(tree) is dict and not tree:
        return [], _EMPTY_DICT_SPEC
    leaves, spec = optree.tree_flatten(tree)
    return leaves, spec


def unflatten(spec: optree.PyTreeSpec, leaves: Sequence[Tensor]) -> PyTree:
    """Inverse of :func:`flatten`."""
    if spec is _EMPTY_DICT_SPEC:
        return {}
    return optree.tree_unflatten(spec, list(leaves))


def leaf_paths(tree: PyTree) -> list[str]:
    """Each leaf's path in ``tree`` (``"layer.weight"``, ``"0.1"``), in :func:`flatten`'s order; for messages."""
    if type(tree) is dict and not tree:
        return []
    return [".".join(str(key) for key in path) for path in optree.tree_paths(tree)]


def same_structure(spec: optree.PyTreeSpec, other: optree.PyTreeSpec) -> bool:
    """Whether two treespecs are equal; always True under torch.compile.

    The check gives eager calls a clear message for mismatched pytrees. Some torch releases (2.11)
    cannot trace ``PyTreeSpec.__eq__``, so compiled calls skip it (run one step eagerly to get the message).
    """
    return torch.compiler.is_compiling() or spec == other


def global_norm(leaves: Sequence[Tensor]) -> Tensor:
    """L2 norm over every element of every leaf: sqrt(sum_i ||x_i||^2), a 0-dim tensor.

    Computed in fp32 (fp64 if any leaf is fp64), whatever the leaves' own precision. Sharded leaves
    (:mod:`funcsam.sharding`): sqrt of the sum of the local squares, all-reduced once over the shards.
    """
    leaves = list(leaves)
    dtype = torch.float64 if any(leaf.dtype == torch.float64 for leaf in leaves) else torch.float32
    if sharding.uses_shards(leaves):
        norms = torch._foreach_norm(sharding.local_views(leaves))
        return sharding.reduced_sum(leaves, [n.to(dtype).square() for n in norms]).sqrt()
    norms = torch._foreach_norm(leaves)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """sum_i <a_i, b_i> over aligned leaf lists: a 0-dim tensor, accumulated in fp32 (fp64 if any leaf
    of ``a`` is fp64), as :func:`global_norm`; over sharded leaves, the local sums all-reduced once."""
    dtype = torch.float64 if any(leaf.dtype == torch.float64 for leaf in a) else torch.float32
    if sharding.uses_shards(a):
        local_a, local_b = sharding.local_views(a), sharding.local_views(b)
        return sharding.reduced_sum(a, [torch.sum(x.to(dtype) * y.to(dtype)) for x, y in zip(local_a, local_b)])
    return torch.stack([torch.sum(x.to(dtype) * y.to(dtype)) for x, y in zip(a, b)]).sum()


def dots(pairs: Sequence[tuple[Sequence[Tensor], Sequence[Tensor]]]) -> list[Tensor]:
    """``[dot(a, b) for a, b in pairs]``, every list aligned with the first; over sharded leaves the
    local sums travel in one all-reduce together (plain leaves: :func:`dot` each, bit for bit)."""
    pairs = [(list(a), list(b)) for a, b in pairs]
    if not sharding.uses_shards(pairs[0][0]):
        return [dot(a, b) for a, b in pairs]
    dtype = torch.float64 if any(leaf.dtype == torch.float64 for a, _ in pairs for leaf in a) else torch.float32
    local = [(sharding.local_views(a), sharding.local_views(b)) for a, b in pairs]
    partial = [torch.stack([torch.sum(a[i].to(dtype) * b[i].to(dtype)) for a, b in local])
               for i in range(len(pairs[0][0]))]
    return list(sharding.reduced_sum(pairs[0][0], partial).unbind())


def mean_of(lists: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """The leafwise mean of K aligned leaf lists: ``(1/K) sum_k x_k``."""
    return [torch.stack(parts).mean(dim=0) for parts in zip(*lists)]


def clone_all(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Detached copies of ``tensors``, made with one multi-tensor kernel per dtype where the device has one."""
    tensors = [t.detach() for t in tensors]
    # foreach kernels have no vmap batching rule, and bool * 1 would promote to int64.
    if not tensors or traced_or_transformed() or any(t.dtype == torch.bool for t in tensors):
        return [t.clone() for t in tensors]
    return torch._foreach_mul(tensors, 1)


def traced_or_transformed() -> bool:
    """True under torch.compile or inside a torch.func transform (vmap, grad, ...)."""
    return torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None


def select(condition: Tensor, if_true: Sequence[Tensor], if_false: Sequence[Tensor]) -> list[Tensor]:
    """Leafwise ``torch.where(condition, a, b)`` for a 0-dim bool ``condition``.

    This is how a step is skipped without a host sync or a Python branch on a tensor value.
    """
    return [torch.where(condition, a, b) for a, b in zip(if_true, if_false)]


def picker(condition: Tensor, select_fn: Callable[[Tensor, Any, Any], Any] = select) -> Callable[[Any, Any], Any]:
    """``pick(if_true, if_false)``: one of two values by a 0-dim bool ``condition``.

    Eager on the CPU, reading ``condition`` on the host is free, and picking returns one of the two
    as it is (``torch.where`` would write a third copy beside them). Traced, transformed or on an
    accelerator it is ``select_fn(condition, if_true, if_false)`` (:func:`select`, or a state's
    fieldwise form): no host sync, no Python branch on a tensor value.
    """
    if condition.device.type == "cpu" and not traced_or_transformed():
        taken = bool(condition)
        return lambda if_true, if_false: if_true if taken else if_false
    return functools.partial(select_fn, condition)
