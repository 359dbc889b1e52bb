"""Data-parallel SAM step time: N gloo processes against one process, on the same global batch.

    python bench/bench_distributed.py --threads 2                                  # 1 process, 2 threads
    python bench/bench_distributed.py --threads 1                                  # 1 process, 1 thread
    torchrun --nproc_per_node 2 bench/bench_distributed.py --threads 1            # 2 processes x 1 thread
    torchrun --nproc_per_node 2 bench/bench_distributed.py --threads 1 --sam-sync local

Options: [--model resnet20|tiny] [--global-batch 128] [--steps 8] [--sam-sync global|local].
Each rank steps on its shard of the global batch with ``grad_reduce=all_reduce_mean()``; rank 0
prints the median step time and, separately, the median time of one gradient all-reduce.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dp = fd.init_data_parallel()
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


if __name__ == "__main__":
    main()
