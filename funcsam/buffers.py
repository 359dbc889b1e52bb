"""A model's buffers (BatchNorm running statistics) around SAM's passes: snapshot, restore, keep or undo.

With ``model=``, the optimizers keep the statistics of the pass at w only, as ``sam_step`` does::

    before = snapshot(model)                        the buffers before the step (closure style)
    first  = snapshot(model)                        after the pass at w, before the pass at w + e
    restore(model, first)                           after the pass at w + e: its updates are dropped
    keep_if(finite, model, before)                  a skipped step undoes the pass at w's updates too

Every copy is one multi-tensor kernel; nothing reads a value on the host.
"""

from __future__ import annotations

import torch

from .tree import Tensor, clone_all, select

__all__ = ["keep_if", "restore", "snapshot"]


def snapshot(model: torch.nn.Module | None) -> list | None:
    """Copies of ``model``'s buffers (None without a model)."""
    return None if model is None else clone_all(list(model.buffers()))


def restore(model: torch.nn.Module | None, saved: list | None) -> None:
    """Write a :func:`snapshot` back into ``model``'s buffers (nothing without either)."""
    if model is None or saved is None:
        return
    buffers = list(model.buffers())
    if buffers:
        torch._foreach_copy_(buffers, saved)


def keep_if(finite: Tensor, model: torch.nn.Module | None, before: list | None) -> None:
    """``model``'s buffers where the step was taken (``finite``), the snapshot ``before`` where it was skipped."""
    if model is None or not before:
        return
    buffers = list(model.buffers())
    torch._foreach_copy_(buffers, select(finite, buffers, before))
