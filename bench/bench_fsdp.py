"""SAM under FSDP2 (``fully_shard``): step time against the same engine's plain step, and the collectives a step adds.

    torchrun --nproc_per_node 2 bench/bench_fsdp.py                       # gloo on the CPU, MLP
    torchrun --nproc_per_node 2 bench/bench_fsdp.py --model resnet20      # a small ResNet, BatchNorm

Options: [--model mlp|resnet20|tiny] [--batch 32 (per rank)] [--rounds 5] [--steps 3 (per round)].
Each variant (plain SGD, SAM over SGD, SAMSGD, plain AdamW, SAM over AdamW; then one SAM step of
every mode) runs on its own ``fully_shard``ed copy of the model, each block sharded, then the root.
Rounds interleave the variants, so that a load change on the machine hits all of them alike; rank 0
prints each variant's median step time and its ratio to the plain step of its base optimizer.

The collectives are counted by wrapping ``torch.distributed``'s collectives (FSDP2 calls
``all_gather_single``/``all_gather_into_tensor`` and ``reduce_scatter_tensor`` through them; funcsam's
reductions call ``all_reduce``) during one step after the warm-up.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import funcsam

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
               "reduce_scatter_tensor",
               "reduce_scatter", "broadcast")
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
ADAMW = dict(lr=1e-3, weight_decay=0.05)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, 10))
    from train.models import build_model

    return build_model(name, 10)


def sharded(name: str, mesh) -> nn.Module:
    """``fully_shard`` on each top-level child with parameters (a layer, a stage of blocks), then the root."""
    model = build(name)
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def variants() -> dict:
    """name -> (base name, optimizer factory over (params, model), uses SAM's closure)."""
    return {
        "SGD": ("SGD", lambda p, m: torch.optim.SGD(p, **SGD), False),
        "SAM(SGD)": ("SGD", lambda p, m: funcsam.SAM(p, torch.optim.SGD, rho=0.05, **SGD), True),
        "SAMSGD": ("SGD", lambda p, m: funcsam.SAMSGD(p, rho=0.05, **SGD), True),
        "AdamW": ("AdamW", lambda p, m: torch.optim.AdamW(p, **ADAMW), False),
        "SAM(AdamW)": ("AdamW", lambda p, m: funcsam.SAM(p, torch.optim.AdamW, rho=0.05, **ADAMW), True),
    }


def mode_variants() -> dict:
    """One step of each mode on SAMSGD (SGD with momentum), for the collective count."""
    def samsgd(**kwargs):
        return lambda p, m: funcsam.SAMSGD(p, rho=0.05, **SGD, **kwargs)

    return {
        "SAMSGD max_grad_norm=1": samsgd(max_grad_norm=1.0),
        "SAMSGD adaptive (ASAM)": samsgd(adaptive=True),
        "SAMSGD model= (BatchNorm)": lambda p, m: funcsam.SAMSGD(p, rho=0.05, model=m, **SGD),
        "SAMSGD every(2), SAM step": samsgd(mode=funcsam.every(2)),
        "SAMSGD LookSAM(k=2), SAM step": samsgd(mode=funcsam.LookSAM(k=2)),
        "SAMSGD MSAM": samsgd(mode=funcsam.MSAM()),
        "SAMSGD GSAM(0.5)": samsgd(mode=funcsam.GSAM(alpha=0.5)),
        "SAMSGD AESAM": samsgd(mode=funcsam.AESAM(total_steps=100)),
    }


def one_step(model, optimizer, batch, sam: bool) -> None:
    inputs, targets = batch

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    if sam:
        optimizer.step(closure)
    else:
        closure()
        optimizer.step()


@contextlib.contextmanager
def counted_collectives():
    """``{name: calls}`` of torch.distributed's collectives while inside."""
    counts = collections.Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    for name, function in originals.items():
        setattr(dist, name, counting(name, function))
    try:
        yield counts
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(rank)
    batch = (torch.randn(args.batch, 3, 32, 32, generator=generator),
             torch.randint(0, 10, (args.batch,), generator=generator))

    runs = {}
    for name, (base, factory, sam) in variants().items():
        model = sharded(args.model, mesh)
        runs[name] = (model, factory(model.parameters(), model), sam, base)
    counts = {}
    for name, (model, optimizer, sam, _) in runs.items():
        one_step(model, optimizer, batch, sam)  # warm-up: state, buffers
        with counted_collectives() as counted:
            one_step(model, optimizer, batch, sam)
        counts[name] = dict(counted)
    for name, factory in mode_variants().items():
        model = sharded(args.model, mesh)
        optimizer = factory(model.parameters(), model)
        one_step(model, optimizer, batch, True)  # MSAM needs a momentum; the schedules' step 1 is cheap
        if "every" in name or "LookSAM" in name:
            one_step(model, optimizer, batch, True)  # back to a SAM step (step 2)
        with counted_collectives() as counted:
            one_step(model, optimizer, batch, True)
        counts[name] = dict(counted)

    times = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, (model, optimizer, sam, _) in runs.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                one_step(model, optimizer, batch, sam)
            times[name].append((time.perf_counter() - start) / args.steps)

    if rank == 0:
        n_params = sum(p.numel() for p in build(args.model).parameters())
        print(f"{args.model} ({n_params / 1e6:.3f} M params), fully_shard over {world} gloo ranks on the CPU, "
              f"1 thread each, batch {args.batch} per rank, {args.rounds} interleaved rounds of {args.steps} steps; "
              f"torch {torch.__version__}")
        print(f"{'variant':32s} {'median step':>12s} {'x plain':>8s}  collectives in one step")
        for name in list(runs) + list(mode_variants()):
            base = runs[name][3] if name in runs else "SGD"
            median = statistics.median(times[name]) if name in times else None
            ratio = median / statistics.median(times[base]) if median is not None else None
            shown = ", ".join(f"{key} {value}" for key, value in sorted(counts[name].items()))
            print(f"{name:32s} {'' if median is None else f'{1e3 * median:9.1f} ms':>12s} "
                  f"{'' if ratio is None else f'{ratio:7.2f}x':>8s}  {shown}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
