"""Data-parallel SAM on ``torch.distributed``: a gradient all-reduce hook for ``sam_step`` and helpers.

Every process (rank) holds the whole model, takes its contiguous shard of each global batch and
computes its gradients; ``grad_reduce=all_reduce_mean()`` averages them across the process group::

    sam_sync="global":  g = mean_r g_r;  e = rho g / ||g||;  g_sam = mean_r grad L_r(w + e)
                        (identical to one process on the global batch, for a BatchNorm-free model)
    sam_sync="local":   e_r = rho g_r / ||g_r||;  g_sam = mean_r grad L_r(w + e_r)
                        (m-sharpness with m = the per-replica batch, as the SAM paper ran on TPUs)

Usage, under ``torchrun --nproc_per_node N script.py``::

    dp = funcsam.distributed.init_data_parallel()          # gloo on CPUs, NCCL on GPUs
    reduce = funcsam.distributed.all_reduce_mean()
    for global_batch in batches:                            # the same batches, same order, on every rank
        batch = funcsam.distributed.local_shard(global_batch)
        out = funcsam.sam_step(params, buffers, batch, loss_fn, rho, lr, state,
                               grad_reduce=reduce, sam_sync="global")
        if dp.is_main:
            print(out.loss)                                 # only rank 0 prints and writes files

The hook works with any process group (``all_reduce_mean(group)``) and with the m-sharpness and
accumulated steps. BatchNorm statistics stay per replica unless the model is converted with
:func:`convert_sync_batchnorm`.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from .batching import shard_batch
from .options import GradReduce
from .tree import Tensor


def _require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call funcsam.distributed.init_data_parallel() "
            "(or torch.distributed.init_process_group) first, e.g. under torchrun"
        )


def all_reduce_mean(group: dist.ProcessGroup | None = None, *, bucket_cap_mb: float | None = None) -> GradReduce:
    """A ``grad_reduce`` hook for ``sam_step``: the mean of a flat gradient list over ``group``'s ranks.

    The leaves are copied into one flat buffer per dtype (or into buckets of at most
    ``bucket_cap_mb`` MiB each, if given) and each buffer is summed with one ``dist.all_reduce``,
    then divided by the group size: SUM-then-divide works on every backend (gloo has no AVG).
    Pure: the gradients passed in are not modified; the returned ones are views of the buffers.
    Under ``torch.compile`` the all-reduces are functional collectives, traced into the graph.

    Args:
        group: the process group to average over (default: the whole world).
        bucket_cap_mb: largest buffer per all-reduce; None puts every leaf of a dtype in one call.
    """
    _require_initialized()
    if bucket_cap_mb is not None and not bucket_cap_mb > 0:
        raise ValueError(f"bucket_cap_mb must be > 0 or None (one buffer per dtype), got {bucket_cap_mb}")
    world_size = dist.get_world_size(group)
    cap_bytes = None if bucket_cap_mb is None else int(bucket_cap_mb * 2**20)

    def reduce(grads: list[Tensor]) -> list[Tensor]:
        grads = list(grads)
        reduced: list[Tensor | None] = [None] * len(grads)
        for bucket in _buckets(grads, cap_bytes):
            flat = torch.cat([grads[i].reshape(-1) for i in bucket])  # a fresh buffer: inputs stay as they were
            flat = _all_reduce_mean_of_buffer(flat, group, world_size)
            pieces = flat.split([grads[i].numel() for i in bucket])
            for i, piece in zip(bucket, pieces):
                reduced[i] = piece.view(grads[i].shape)
        return reduced

    return reduce


def _all_reduce_mean_of_buffer(flat: Tensor, group: dist.ProcessGroup | None, world_size: int) -> Tensor:
    """sum_r flat_r / world_size over ``group``'s ranks. Under torch.compile a functional collective
    (``torch.distributed._functional_collectives.all_reduce``): traced into the graph as an op with
    an explicit wait, which the compiler may overlap with the computation around it. Eager: the
    in-place ``dist.all_reduce`` and division on ``flat`` (a fresh buffer), with no extra copy."""
    if torch.compiler.is_compiling():
        return funcol.all_reduce(flat, "sum", dist.group.WORLD if group is None else group) / world_size
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return flat.div_(world_size)


def _buckets(grads: Sequence[Tensor], cap_bytes: int | None) -> list[list[int]]:
    """Indices of ``grads`` grouped by (dtype, device), each group cut into runs of at most ``cap_bytes``."""
    groups: dict[tuple, list[list[int]]] = {}
    for i, grad in enumerate(grads):
        runs = groups.setdefault((grad.dtype, grad.device), [[]])
        run_bytes = sum(grads[j].numel() * grads[j].element_size() for j in runs[-1])
        if cap_bytes is not None and runs[-1] and run_bytes + grad.numel() * grad.element_size() > cap_bytes:
            runs.append([])
        runs[-1].append(i)
    return [run for runs in groups.values() for run in runs]


def local_shard(global_batch: Any, group: dist.ProcessGroup | None = None) -> Any:
    """This rank's contiguous ``1/world_size`` of ``global_batch`` (see :func:`funcsam.shard_batch`).

    Raises a ``ValueError`` naming both numbers when the world size does not divide the batch size.
    """
    _require_initialized()
    return shard_batch(global_batch, dist.get_rank(group), dist.get_world_size(group))


def is_main_process(group: dist.ProcessGroup | None = None) -> bool:
    """True on rank 0 of ``group``, and in a process that is not part of any distributed run."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank(group) == 0


class DataParallel(NamedTuple):
    """Where this process stands in a data-parallel run.

    Fields:
        rank: this process's rank in the world, 0 .. world_size - 1.
        world_size: the number of processes (1 when not launched by torchrun).
        local_rank: the rank on this machine; it picks the GPU.
        device: the device this process computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, writes metrics and writes checkpoints."""
        return self.rank == 0


def init_data_parallel(
    backend: str | None = None, *, timeout: datetime.timedelta = datetime.timedelta(minutes=10)
) -> DataParallel:
    """Join the process group that ``torchrun`` describes in the environment, once per process.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them (a plain ``python`` run) it
    returns a one-process :class:`DataParallel` and initialises nothing. The backend defaults to NCCL
    when CUDA is available (each process then uses GPU ``local_rank``) and gloo otherwise.
    """
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return DataParallel(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = backend or ("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Naming the device binds NCCL's communicator to this rank's GPU from the start.
        device_id = device if device.type == "cuda" else None
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, device_id=device_id)
    return DataParallel(rank, world_size, local_rank, device)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch, across ``process_group``.

    Unlike ``torch.nn.SyncBatchNorm`` (CUDA only, and an autograd.Function that torch.func cannot
    differentiate), it runs on any device and backend, including gloo on CPUs, under ``torch.func.grad``:
    each rank contributes ``(mean_r, var_r, n_r)`` of its shard through an all-gather that
    torch.autograd can differentiate, and the global statistics are

        n = sum_r n_r,   mean = sum_r n_r mean_r / n,   var = sum_r n_r (var_r + (mean_r - mean)^2) / n

    Normalisation uses ``var`` (biased); the running variance is updated with ``var * n / (n - 1)``,
    as BatchNorm does on one process with the global batch. In eval mode, or without an initialised
    process group of more than one rank, it is ordinary BatchNorm. Build it with
    :func:`convert_sync_batchnorm`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, ...), got {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        synchronise = (
            self.training and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )
        if not synchronise:
            return super().forward(input)
        self._check_input_dim(input)
        mean, var, count = _global_batch_statistics(input, self.process_group)
        if self.training and self.track_running_stats:
            self._update_running_statistics(mean.detach(), var.detach(), count)
        # In fp32 whatever the input's precision, as BatchNorm runs under autocast.
        shape = (1, -1) + (1,) * (input.dim() - 2)
        output = (input.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output.to(input.dtype)

    def _update_running_statistics(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # momentum=None is BatchNorm's cumulative average; kept as a tensor so that nothing syncs.
        factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))


def _global_batch_statistics(input: Tensor, group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, biased var, n)`` per channel over every rank's ``input``, in fp32, differentiable across ranks."""
    dims = [0] + list(range(2, input.dim()))
    x = input.float()
    local_count = torch.full((1,), input.numel() // input.shape[1], dtype=x.dtype, device=x.device)
    local = torch.cat([x.mean(dims), x.var(dims, unbiased=False), local_count])
    gathered = _AllGather.apply(local, group)
    channels = input.shape[1]
    means, variances, counts = gathered[:, :channels], gathered[:, channels:-1], gathered[:, -1:]
    count = counts.sum()
    mean = (counts * means).sum(0) / count
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / count
    return mean, var, count


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a :class:`SyncBatchNorm` sharing its
    parameters and buffers (names unchanged, so checkpoints load either way). Like
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, containers are modified in place and returned.

    Use it for ``sam_step``/``accumulated_sam_step`` under data parallelism; not with
    ``m_sharpness_sam_step``, whose parts are BatchNorm groups by design (and collectives do not run
    under vmap).
    """
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted


class _AllGather(torch.autograd.Function):
    """``(world_size, *local.shape)``: every rank's ``local`` stacked in rank order.

    Backward: rank r's statistics feed every rank's loss, so their gradient is the sum over ranks
    of each rank's gradient for row r (an all-reduce of the whole, small, gradient). Written with
    ``setup_context`` because torch.func transforms accept only that form of autograd.Function
    (``torch.nn.SyncBatchNorm``'s and the functional collectives' autograd are of the older form).
    """

    @staticmethod
    def forward(local: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local.contiguous(), group=group)
        return torch.stack(gathered)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        summed = grad.contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        return summed[dist.get_rank(ctx.group)], None
