"""Data-parallel SAM step time: N gloo processes against one process, on the same global batch.

    python bench/bench_distributed.py --threads 2                                  # 1 process, 2 threads
    python bench/bench_distributed.py --threads 1                                  # 1 process, 1 thread
    torchrun --nproc_per_node 2 bench/bench_distributed.py --threads 1            # 2 processes x 1 thread
    torchrun --nproc_per_node 2 bench/bench_distributed.py --threads 1 --sam-sync local

Options: [--model resnet20|tiny] [--global-batch 128] [--steps 8] [--sam-sync global|local].
Each rank steps on its shard of the global batch with ``grad_reduce=all_reduce_mean()``; rank 0
prints the median step time and, separately, the median time of one gradient all-reduce.

The drop-in optimizers under DistributedDataParallel (``--ddp``; 2 processes at least)::

    torchrun --nproc_per_node 2 bench/bench_distributed.py --ddp --threads 1 [--rounds 5]

times DDP + torch.optim.SGD, DDP + SAMSGD(sam_sync="global") and DDP + SAMSGD(sam_sync="local") in
interleaved rounds (the order rotating each round), and prints each one's median s/step, its ratio
to SGD, and the collectives each step issued: DDP's bucket all-reduces (counted by a comm hook that
calls DDP's default all-reduce) and any other ``dist.all_reduce`` (counted by wrapping it), also
for GSAM under local perturbation (the mode reads g: one more reduction).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import funcsam
import funcsam.distributed as fd
from train.models import build_model

HYPER = dict(momentum=0.9, weight_decay=5e-4)
LR, RHO = 0.1, 0.05


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sam-sync", choices=["global", "local"], default="global")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ddp", action="store_true", help="time the drop-in optimizers under DDP (see above)")
    parser.add_argument("--rounds", type=int, default=5, help="--ddp: interleaved rounds of --steps steps each")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dp = fd.init_data_parallel()
    if args.ddp:
        return bench_ddp(args, dp)
    reduce = fd.all_reduce_mean() if dist.is_initialized() else None
    torch.manual_seed(0)  # the same model and global batch on every rank
    model = build_model(args.model, 10).to(dp.device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    state = funcsam.init_momentum(params)
    global_batch = (torch.randn(args.global_batch, 3, 32, 32, device=dp.device),
                    torch.randint(0, 10, (args.global_batch,), device=dp.device))
    batch = fd.local_shard(global_batch) if dist.is_initialized() else global_batch
    sync = torch.cuda.synchronize if dp.device.type == "cuda" else (lambda: None)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)

    times = []
    for step in range(args.steps + 1):  # the first step is a warm-up
        if reduce is not None:
            dist.barrier()
        start = time.perf_counter()
        out = funcsam.sam_step(params, buffers, batch, loss_fn, RHO, LR, state, **HYPER,
                               grad_reduce=reduce, sam_sync=args.sam_sync)
        params, buffers, state = out.params, out.buffers, out.momentum_state
        sync()
        if step:
            times.append(time.perf_counter() - start)

    reduce_times = []
    if reduce is not None:
        grads = list(params.values())
        for _ in range(args.steps):
            dist.barrier()
            start = time.perf_counter()
            reduce(grads)
            sync()
            reduce_times.append(time.perf_counter() - start)

    if dp.is_main:
        n_params = sum(p.numel() for p in params.values())
        where = (f"{torch.cuda.get_device_name()} (NCCL)" if dp.device.type == "cuda"
                 else f"{torch.get_num_threads()} thread(s) each")
        line = (f"{args.model} ({n_params / 1e6:.3f} M params), global batch {args.global_batch}, "
                f"{dp.world_size} process(es), {where}, sam_sync={args.sam_sync}: "
                f"median step {statistics.median(times):.3f} s")
        if reduce_times:
            line += f", one gradient all-reduce {1e3 * statistics.median(reduce_times):.1f} ms"
        print(line, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


# --- the drop-in optimizers under DistributedDataParallel ------------------------------------

COUNTS: collections.Counter = collections.Counter()  # "bucket" and "all_reduce" calls, all contenders


def counting_allreduce_hook(process_group, bucket):
    """DDP's default all-reduce of one gradient bucket, counted."""
    COUNTS["bucket"] += 1
    return allreduce_hook(process_group, bucket)


def counting(all_reduce):
    def wrapped(*args, **kwargs):
        COUNTS["all_reduce"] += 1
        return all_reduce(*args, **kwargs)
    return wrapped


def ddp_contender(name: str, args, device):
    """``(step(batch), its DDP model)``: one training step of ``name`` on a fresh DDP model."""
    torch.manual_seed(0)
    ddp = DDP(build_model(args.model, 10).to(device))
    ddp.register_comm_hook(None, counting_allreduce_hook)
    if name == "sgd":
        optimizer = torch.optim.SGD(ddp.parameters(), lr=LR, **HYPER)
    else:
        sync, mode = {"sam_global": ("global", None), "sam_local": ("local", None),
                      "gsam_local": ("local", funcsam.GSAM(alpha=0.2))}[name]
        optimizer = funcsam.SAMSGD(ddp.parameters(), lr=LR, rho=RHO, **HYPER, model=ddp, sam_sync=sync, mode=mode)

    def step(batch):
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(ddp(batch[0]), batch[1])
            loss.backward()
            return loss
        if name == "sgd":
            closure()
            optimizer.step()
        else:
            optimizer.step(closure)

    return step


def bench_ddp(args, dp) -> None:
    if dp.world_size < 2:
        raise SystemExit("--ddp compares DistributedDataParallel runs: start it with torchrun --nproc_per_node 2")
    torch.manual_seed(0)
    global_batch = (torch.randn(args.global_batch, 3, 32, 32, device=dp.device),
                    torch.randint(0, 10, (args.global_batch,), device=dp.device))
    batch = fd.local_shard(global_batch)
    sync = torch.cuda.synchronize if dp.device.type == "cuda" else (lambda: None)
    dist.all_reduce = counting(dist.all_reduce)  # funcsam.distributed calls it through this module

    timed, counted = ["sgd", "sam_global", "sam_local"], ["gsam_local"]
    steps = {name: ddp_contender(name, args, dp.device) for name in timed + counted}
    collectives = {}
    for name, step in steps.items():  # warm-up, and what one step issues
        step(batch)
        COUNTS.clear()
        step(batch)
        sync()
        collectives[name] = dict(COUNTS)
    times = {name: [] for name in timed}
    for round_ in range(args.rounds):
        order = timed[round_ % len(timed):] + timed[:round_ % len(timed)]
        for name in order:
            for _ in range(args.steps):
                dist.barrier()
                start = time.perf_counter()
                steps[name](batch)
                sync()
                times[name].append(time.perf_counter() - start)

    if dp.is_main:
        where = (f"{torch.cuda.get_device_name()} (NCCL)" if dp.device.type == "cuda"
                 else f"{torch.get_num_threads()} thread(s) each")
        print(f"{args.model}, global batch {args.global_batch}, DDP on {dp.world_size} processes, {where}, "
              f"{args.rounds} interleaved rounds of {args.steps} steps", flush=True)
        sgd = statistics.median(times["sgd"])
        for name in timed + counted:
            line = f"  {name:<11}"
            if name in times:
                median = statistics.median(times[name])
                line += f" median {median:.4f} s/step  {median / sgd:.2f}x SGD"
            buckets = collectives[name].get("bucket", 0)
            others = collectives[name].get("all_reduce", 0) - buckets  # DDP's hook calls dist.all_reduce too
            line += f"  collectives per step: {buckets} DDP bucket all-reduce(s), {others} other all_reduce(s)"
            print(line, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
