"""The trainer's few collectives under torchrun: what rank 0 decides, every rank learns.

With one process every function here is a no-op (or calls straight through), so the training loop
reads the same either way.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

import funcsam.distributed
from train.steppers import TrainTotals

T = TypeVar("T")


def join(device: torch.device) -> tuple[funcsam.distributed.DataParallel, torch.device]:
    """Join torchrun's process group (gloo for --device cpu even where a GPU exists)."""
    dp = funcsam.distributed.init_data_parallel("nccl" if device.type == "cuda" else "gloo")
    return dp, (dp.device if dp.world_size > 1 else device)


def attempt_on_rank_0(dp: funcsam.distributed.DataParallel, fn: Callable[[], Any],
                      expected: type[Exception]) -> Exception | None:
    """``fn()`` on rank 0 alone; its failure (``expected``) is returned for ``agree`` to raise on every
    rank later, so that collective-free checks can come first. With one process it raises at once."""
    if dp.world_size == 1:
        fn()
        return None
    if dp.is_main:
        try:
            fn()
        except expected as err:
            return err
    return None


def agree(dp: funcsam.distributed.DataParallel, failure: Exception | None, kind: type[Exception]) -> None:
    """Raise rank 0's ``failure`` on rank 0 and a ``kind`` on the others (rank 0 alone says why)."""
    if dp.world_size > 1:
        ok = torch.tensor([failure is None], dtype=torch.int32, device=dp.device)  # NCCL takes device tensors only
        dist.broadcast(ok, src=0)
        if not ok.item() and not dp.is_main:
            raise kind("rank 0 stopped (its message says why)")
    if failure is not None:
        raise failure


def on_rank_0_first(dp: funcsam.distributed.DataParallel, fn: Callable[[], T], expected: type[Exception]) -> T:
    """``fn()`` on rank 0, then on the others once it succeeded (rank 0 downloads, the others read
    what it left). A failure of rank 0 fails every rank instead of leaving them waiting."""
    result = failure = None
    if dp.is_main:
        try:
            result = fn()
        except expected as err:
            failure = err
    agree(dp, failure, expected)
    return result if dp.is_main else fn()


def share_from_rank_0(obj: Any, dp: funcsam.distributed.DataParallel) -> Any:
    """Rank 0's ``obj`` on every rank (a small picklable value)."""
    if dp.world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, device=dp.device)
    return holder[0]


def barrier(dp: funcsam.distributed.DataParallel) -> None:
    if dp.world_size > 1:
        dist.barrier()


def global_totals(totals: TrainTotals, world_size: int) -> TrainTotals:
    """The epoch's totals over every process: loss and correct summed over the shards; the step
    counts as the worst process saw them (the same steps run everywhere, so every rank decides alike)."""
    if world_size == 1:
        return totals
    sums = torch.stack([totals.loss_sum.double(), totals.correct.double()])  # exact for any epoch's counts
    counts = torch.stack([totals.diverged_steps, totals.skipped_steps])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    return TrainTotals(sums[0].float(), sums[1].to(torch.int64), counts[0], counts[1])
