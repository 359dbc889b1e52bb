"""The drop-in optimizers under ``DistributedDataParallel``: SAM's two passes on several replicas.

A DDP model averages the gradient across replicas in every synchronised backward pass, so
``funcsam.SAM``/``funcsam.SAMSGD`` with ``sam_sync="global"`` (the default) perturb with the reduced
gradient and equal one process on the global batch. ``sam_sync="local"`` (with ``model=ddp_model``)
takes the first pass under ``ddp_model.no_sync()``, as ``funcsam.sam_step(..., sam_sync="local")``::

    g_r    = grad L_r(w)                         no_sync(): replica r's own gradient
    e_r    = rho g_r / (||g_r|| + eps)           (ASAM: rho T^2 g_r / (||T g_r|| + eps))
    g_sam  = mean_r grad L_r(w + e_r)            DDP's reduction of the second backward
    g      = mean_r g_r                          one more reduction, only for modes that read g
                                                 (``Mode.uses_first_gradient``: LookSAM, GSAM, AE-SAM)

The verdict on a non-finite gradient must be the same on every replica, or they drift apart: a
replica whose ||g_r|| is not finite adds ``0 * ||g_r||`` (NaN) to one gradient of its second pass,
through a hook that runs before DDP reduces it, so every replica's g_sam is non-finite and every
replica skips the step, with no extra communication (the pure step's ``spread_non_finite``).

In the ``first_step``/``second_step`` style the caller runs the backward passes: under
``sam_sync="local"`` the first one inside ``with ddp_model.no_sync():``. :class:`Replicas` records,
with a forward pre-hook on the DDP wrapper, whether the last forward will reduce its backward, and
refuses a first pass whose synchronisation contradicts ``sam_sync`` or an unsynchronised second pass.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from .tree import Tensor

__all__ = ["Replicas", "check_sam_sync", "is_ddp"]


def is_ddp(model: Any) -> bool:
    """Whether ``model`` is a ``torch.nn.parallel.DistributedDataParallel`` wrapper."""
    return isinstance(model, DistributedDataParallel)


def check_sam_sync(sam_sync: Any, model: torch.nn.Module | None) -> None:
    """ValueError unless ``sam_sync`` is "global" or "local", and "local" comes with a DDP ``model``."""
    if sam_sync not in ("global", "local"):
        raise ValueError(f"sam_sync must be 'global' (perturb with the gradient DDP averaged) or 'local' (each "
                         f"replica perturbs with its own gradient), got {sam_sync!r}")
    if sam_sync == "local" and not is_ddp(model):
        got = "no model" if model is None else f"model={type(model).__name__}"
        raise ValueError(
            f"sam_sync='local' takes the first pass under DistributedDataParallel.no_sync(), so it needs the DDP "
            f"wrapper as model= (model=ddp_model, not ddp_model.module); got {got}. In one process, or with "
            "sam_sync='global', leave sam_sync out"
        )


class Replicas:
    """An optimizer's view of its DDP model: how it synchronises SAM's first pass, and the checks.

    With a model that is not DDP (or none) every method is a no-op and every check passes.
    """

    def __init__(self, model: torch.nn.Module | None, sam_sync: str):
        check_sam_sync(sam_sync, model)
        self.ddp = model if is_ddp(model) else None
        self.local = sam_sync == "local"
        self.last_forward_syncs: bool | None = None  # None: no forward through the wrapper since the last check
        self._poison: Any = None  # the handle of the hook that spreads a non-finite first gradient
        self._reduce = None
        if self.ddp is not None:
            self.ddp.register_forward_pre_hook(self._record_forward)

    def _record_forward(self, module: DistributedDataParallel, args: Any) -> None:
        self.last_forward_syncs = bool(module.require_backward_grad_sync)

    def _take_record(self) -> bool | None:
        recorded, self.last_forward_syncs = self.last_forward_syncs, None
        return recorded

    def first_pass(self, two_passes: bool):
        """The context of ``step``'s first closure call: ``no_sync()`` for a local SAM step, else none."""
        if self.local and two_passes:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def first_gradient_is_local(self, ran_local: bool) -> bool:
        """Whether the gradient at w is this replica's own: as the last forward recorded it, else
        ``ran_local`` (what ``step`` itself asked for)."""
        recorded = self._take_record()
        return ran_local if recorded is None else not recorded

    def check_first_gradient(self, is_local: bool) -> None:
        """RuntimeError when the first gradient's synchronisation contradicts ``sam_sync``."""
        if self.ddp is None or is_local == self.local:
            return
        if self.local:
            raise RuntimeError(
                "sam_sync='local' perturbs with each replica's own gradient, but the backward pass at w was "
                "synchronised by DDP: run it inside `with model.no_sync(): loss.backward()` before first_step(), "
                "or use step(closure), which does so itself")
        raise RuntimeError(
            "the backward pass at w ran under model.no_sync(): its gradient is this replica's own. Run it outside "
            "no_sync() to perturb with the averaged gradient (sam_sync='global'), or pass sam_sync='local'")

    def check_sam_gradient(self) -> None:
        """RuntimeError when the backward pass at w + e was not synchronised (replicas would drift apart)."""
        if self.ddp is not None and self._take_record() is False:
            raise RuntimeError(
                "the backward pass at w + e ran under model.no_sync(): DDP did not average its gradient, and "
                "the replicas would step apart. Run the second backward outside no_sync(); the parameters "
                "were put back at w")

    def after_climb(self, perturbed: Any, uses_first_gradient: bool) -> Any:
        """Under local perturbation: the hook that spreads a non-finite ||g_r|| through the second
        pass's reduction, and g averaged across replicas where the mode reads it (``first_norm``
        then recomputed from it). ``perturbed`` is :class:`funcsam.two_halves.Perturbed`."""
        if not self.local:
            return perturbed
        self._poison = spread_non_finite_hook(perturbed.params[0], perturbed.grad_norm)
        if not uses_first_gradient:
            return perturbed
        return perturbed._replace(first_grads=self.reduce(perturbed.first_grads), first_norm=None)

    def remove_hook(self) -> None:
        """Remove the hook :meth:`after_climb` set (the pass at w + e is over, or will not come)."""
        if self._poison is not None:
            self._poison.remove()
            self._poison = None

    def reduce(self, grads: list) -> list:
        """The mean of ``grads`` across the DDP model's process group (one flat all-reduce per dtype)."""
        if self._reduce is None:
            from .distributed import all_reduce_mean

            self._reduce = all_reduce_mean(self.ddp.process_group)
        return self._reduce(grads)


def spread_non_finite_hook(param: Tensor, local_grad_norm: Tensor):
    """A hook on ``param`` adding ``0 * local_grad_norm`` (0, or NaN if the norm is inf/NaN) to the
    gradient the next backward computes for it, before it accumulates into ``param.grad`` (where DDP
    reads it to reduce). Returns the removable handle."""
    poison = 0.0 * local_grad_norm.detach()
    return param.register_hook(lambda grad: grad + poison.to(grad.dtype))
