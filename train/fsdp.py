"""``--fsdp``: the adapter API (``funcsam.SAMSGD``, ``funcsam.SAM`` over AdamW) on a model sharded with FSDP2.

Under ``torchrun``, the stepper trains a copy of the model sharded with ``fully_shard`` (each
top-level block, then the root) over all the processes; each rank steps on its part of the global
batch and SAM's norms are global over the mesh (docs: Sharded training: FSDP2). The training loop's
own model stays whole and unsharded: evaluation and the sharpness meter run it on rank 0 with the
full parameters, which every rank gathers at the end of each epoch (the loop's rank-0-only work
comes then, and a collective needs every rank). Checkpoints hold the full tensors, in the adapter's
own format; a resumed run cuts them into the same shards again, so it continues bit for bit.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from funcsam.sharding import is_dtensor
from train.steppers import AdapterStepper, detached


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` sharded in place over every process: ``fully_shard`` on each top-level child that has
    parameters (a stage of blocks, a layer), then on the root, as torchtitan shards a model."""
    # fully_shard takes contiguous parameters only: --channels-last's NHWC weights go back to NCHW
    # storage (the inputs stay channels_last; the checkpoint's values do not depend on the layout).
    model = model.to(memory_format=torch.contiguous_format)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


class ShardedAdapterStepper(AdapterStepper):
    """:class:`train.steppers.AdapterStepper` over a sharded copy of ``model`` (module docstring)."""

    def __init__(self, args, model, lr_at, mean, std, device, *, mode, steps_per_epoch: int):
        super().__init__(args, shard_model(copy.deepcopy(model), device), lr_at, mean, std, device, mode=mode)
        self.steps_per_epoch = steps_per_epoch
        self._gathered: dict | None = None

    @staticmethod
    def _replicated(model: nn.Module, device: torch.device) -> nn.Module:
        """The sharded model itself: FSDP2 reduce-scatters the gradients, no DDP wrapper on top."""
        return model

    def step(self, totals, images, labels, augmentation, step_index: int):
        totals = super().step(totals, images, labels, augmentation, step_index)
        self._gathered = None
        if (step_index + 1) % self.steps_per_epoch == 0:  # the loop's rank-0 evaluation and checkpoint follow
            self._gathered = self._gather()
        return totals

    def _gather(self) -> dict:
        """The full parameters, this rank's buffers and the optimizer's state with every sharded tensor
        whole (collectives: every rank calls it)."""
        params = {name: _whole(p).detach() for name, p in self.model.named_parameters()}
        optimizer = _tree_map_tensors(_whole, self.optimizer.state_dict())
        return dict(params=params, buffers=detached(self.model.named_buffers()), optimizer=optimizer)

    def params_buffers(self):
        if self._gathered is None:
            raise RuntimeError("--fsdp: the full parameters are gathered at the end of each epoch, on every rank; "
                               "they were asked for at another time")
        return self._gathered["params"], self._gathered["buffers"]

    def state_dict(self) -> dict:
        params, buffers = self.params_buffers()
        return dict(params=params, buffers=buffers, optimizer=dict(
            **{self._optimizer_key: self._gathered["optimizer"]}, lr_scheduler=self.scheduler.state_dict(),
            grad_scaler=None if self.scaler is None else self.scaler.state_dict()))

    def load_state_dict(self, saved: dict, path) -> None:
        """As the adapter's, every full tensor cut into this rank's shard (collectives: every rank resumes)."""
        params = dict(self.model.named_parameters())
        self._check_saved(saved, params, dict(self.model.named_buffers()), path)
        optimizer = saved["optimizer"]
        ordered = [p for group in self.optimizer.param_groups for p in group["params"]]
        sharded = _sharded_like(optimizer[self._optimizer_key], ordered)
        with torch.no_grad():
            for name, p in params.items():
                _local(p).copy_(_local(_shard_like(saved["params"][name], p)))
            for name, b in self.model.named_buffers():
                b.copy_(saved["buffers"][name])
        self.optimizer.load_state_dict(sharded)
        self.scheduler.load_state_dict(optimizer["lr_scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(optimizer["grad_scaler"])


def _whole(t):
    return t.full_tensor() if is_dtensor(t) else t


def _local(t):
    return t.to_local() if is_dtensor(t) else t


def _shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``param`` (this rank's shard of it, as a DTensor), or itself for a plain param."""
    if not is_dtensor(param) or full.dim() == 0:
        return full
    return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)


def _sharded_like(state_dict: dict, params: list) -> dict:
    """An adapter state dict of full tensors with each per-parameter tensor (the optimizer's state and
    the mode's per-parameter state) sharded as its parameter."""
    state = {index: {key: _shard_like(value, params[index]) if isinstance(value, torch.Tensor) else value
                     for key, value in values.items()}
             for index, values in state_dict["state"].items()}
    funcsam_entry = dict(state_dict.get("funcsam") or {})
    for key, value in funcsam_entry.items():
        if isinstance(value, dict) and all(isinstance(index, int) for index in value):  # {parameter index: tensor}
            funcsam_entry[key] = {index: _shard_like(tensor, params[index]) for index, tensor in value.items()}
    return {**state_dict, "state": state, **({"funcsam": funcsam_entry} if "funcsam" in state_dict else {})}


def _tree_map_tensors(fn, tree):
    if isinstance(tree, dict):
        return {key: _tree_map_tensors(fn, value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_map_tensors(fn, value) for value in tree)
    return fn(tree).detach().clone() if isinstance(tree, torch.Tensor) else tree
