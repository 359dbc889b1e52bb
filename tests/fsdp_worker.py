"""One rank of the two-process gloo job in test_fsdp.py (started by the test, not by pytest).

    python fsdp_worker.py OUT_DIR

Every configuration of ``CONFIGS`` trains a ``fully_shard``ed model for ``STEPS`` steps, each rank on
its part of the global batch; then the checkpoint runs (``CHECKPOINTS``: save with DCP after
``SAVED_AT`` steps, go on, and resume from the checkpoint on both ranks), then the faults. Each rank
saves what it computed to OUT_DIR/rank<r>.pt; the test computes every reference in one process with
the functions below (``train`` over ``Replicas``: each rank's part forwarded by its own replica,
the losses averaged, so BatchNorm sees what each rank sees).
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import funcsam
from helpers import adapter_steps, bn_convnet, classification_batches, mlp

WORLD, STEPS, GLOBAL_BATCH = 2, 5, 8
SAVED_AT = 3  # the checkpoint runs save after this many steps and take STEPS - SAVED_AT more

SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
ADAMW = dict(lr=0.01, weight_decay=0.05)

# name: (model, optimizer: (SAMSGD | torch.optim class), hyperparameters, call style, extras)
CONFIGS = {
    "sgd_closure": ("mlp", torch.optim.SGD, dict(SGD, rho=0.05), "closure", {}),
    "sgd_first_second": ("mlp", torch.optim.SGD, dict(SGD, rho=0.05), "first_second", {}),
    "adamw_davda54": ("mlp", torch.optim.AdamW, dict(ADAMW, rho=0.05), "davda54_closure", {}),
    "samsgd_closure": ("mlp", "SAMSGD", dict(SGD, rho=0.05), "closure", {}),
    "samsgd_bn_model": ("bn", "SAMSGD", dict(SGD, rho=0.05), "closure", {"model": True}),
    "sgd_bn_model_first_second": ("bn", torch.optim.SGD, dict(SGD, rho=0.05), "first_second", {"model": True}),
    "samsgd_max_grad_norm": ("mlp", "SAMSGD", dict(SGD, rho=0.05, max_grad_norm=0.05), "closure", {}),
    "adamw_max_grad_norm": ("mlp", torch.optim.AdamW, dict(ADAMW, rho=0.05, max_grad_norm=0.05), "first_second", {}),
    "sgd_adaptive": ("mlp", torch.optim.SGD, dict(SGD, rho=0.5, adaptive=True, eta=0.01), "first_second", {}),
    "samsgd_every2": ("mlp", "SAMSGD", dict(SGD, rho=0.05, mode=funcsam.every(2)), "closure", {}),
    "adamw_late2": ("mlp", torch.optim.AdamW, dict(ADAMW, rho=0.05, mode=funcsam.late(2)), "closure", {}),
    "sgd_looksam": ("mlp", torch.optim.SGD, dict(SGD, rho=0.05, mode=funcsam.LookSAM(k=2, alpha=0.7)), "closure", {}),
    "samsgd_msam": ("mlp", "SAMSGD", dict(SGD, rho=0.3, mode=funcsam.MSAM()), "closure", {}),
    "adamw_gsam": ("mlp", torch.optim.AdamW, dict(ADAMW, rho=0.05, mode=funcsam.GSAM(alpha=0.5)), "first_second", {}),
    "samsgd_aesam": ("bn", "SAMSGD", dict(SGD, rho=0.05, mode=funcsam.AESAM(total_steps=STEPS)), "closure",
                     {"model": True}),
    "sgd_fp16_scaler": ("mlp", torch.optim.SGD, dict(SGD, rho=0.05), "closure", {"fp16": True}),
    "samsgd_bf16_policy": ("mlp", "SAMSGD", dict(SGD, rho=0.05), "closure", {"bf16_policy": True}),
    # HSDP on a (2 replicas, 1 shard) mesh: placements (Replicate, Shard); a norm summed over the
    # replicate dimension too would count every shard twice.
    "sgd_looksam_hsdp": ("mlp", torch.optim.SGD, dict(SGD, rho=0.05, mode=funcsam.LookSAM(k=2, alpha=0.7)), "closure",
                         {"hsdp": True}),
}
CHECKPOINTS = ["sgd_looksam", "samsgd_aesam", "adamw_late2"]
# The all-reduces funcsam adds to step 2 (a SAM step in every mode here): one per reduction.
ALL_REDUCES = {
    "sgd_closure": 2,           # ||g||; the finite verdict's ||g_sam||
    "samsgd_max_grad_norm": 2,  # the same: clipping reuses ||g_sam||
    "sgd_adaptive": 2,          # ||T g||; ||g_sam||
    "sgd_looksam": 3,           # ||g||; ||g_sam||; g_sam . g and g . g together
    "adamw_gsam": 3,            # ||g||; ||g_sam||; g . g_sam and g_sam . g_sam together
    "samsgd_msam": 2,           # ||m||; ||g|| (one pass)
}


def build_model(kind: str) -> nn.Module:
    return mlp(seed=0) if kind == "mlp" else bn_convnet(seed=0)


def global_batches(kind: str) -> list:
    """The same global batches on every rank and in the test's references."""
    return classification_batches(STEPS, GLOBAL_BATCH, (6,) if kind == "mlp" else (3, 4, 4), seed=3)


def part(batch, rank: int, world: int = WORLD):
    return funcsam.shard_batch(batch, rank, world)


def parts_of(batches: list, rank: int) -> list:
    """Rank ``rank``'s part of each global batch."""
    return [part(batch, rank) for batch in batches]


def build_optimizer(config: str, params, model: nn.Module):
    """The optimizer of ``config`` over ``params`` (``model`` for ``model=``)."""
    _, base, hyper, _, extras = CONFIGS[config]
    hyper = dict(hyper, model=model if extras.get("model") else None)
    if base == "SAMSGD":
        return funcsam.SAMSGD(params, **hyper)
    return funcsam.SAM(params, base, **hyper)


class Replicas(nn.Module):
    """``world`` copies of ``model`` sharing its parameters (replica 0's), each with buffers of its
    own, each forwarding its rank's part of the batch: one process doing what the ranks of a sharded
    run do. The outputs are concatenated, so a mean loss over them is the mean of the ranks' losses."""

    def __init__(self, model: nn.Module, world: int = WORLD):
        super().__init__()
        self.replicas = nn.ModuleList([model] + [copy.deepcopy(model) for _ in range(world - 1)])
        for replica in self.replicas[1:]:
            for name, p in model.named_parameters():
                owner, _, leaf = name.rpartition(".")
                setattr(replica.get_submodule(owner) if owner else replica, leaf, p)

    def forward(self, x):
        outputs = []
        for rank, replica in enumerate(self.replicas):
            # Under autocast, a fresh cast per replica: a cached one would sum the replicas' fp16
            # gradients in fp16, where FSDP2 averages each rank's fp32 gradient.
            with torch.autocast("cpu", enabled=torch.is_autocast_enabled("cpu"), cache_enabled=False):
                outputs.append(replica(part(x, rank, len(self.replicas))))
        return torch.cat(outputs)


def train(config: str, model: nn.Module, optimizer, batches: list, scaler=None) -> None:
    """``optimizer``'s steps over ``batches`` in ``config``'s call style (``helpers.adapter_steps``)."""
    style, extras = CONFIGS[config][3], CONFIGS[config][4]
    adapter_steps(model, optimizer, batches, style, scaler=scaler,
                  autocast_dtype=torch.float16 if extras.get("fp16") else None)


def make_scaler(config: str):
    """fp16 loss scaling on the CPU: torch.amp.GradScaler("cpu"), a small initial scale so it moves."""
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2) if CONFIGS[config][4].get("fp16") \
        else None


# ------------------------------------------------------------------------------------------------
# The sharded side (runs only under the test's two gloo ranks).

def shard(model: nn.Module, mesh, bf16_policy: bool = False) -> nn.Module:
    """``fully_shard`` on each child with parameters, then on the root, as torchtitan shards blocks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16_policy else MixedPrecisionPolicy()
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def full_params(model: nn.Module) -> dict:
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def buffers_of(model: nn.Module) -> dict:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def run_config(config: str, meshes: dict, rank: int) -> dict:
    kind, extras = CONFIGS[config][0], CONFIGS[config][4]
    mesh = meshes["hsdp" if extras.get("hsdp") else "fsdp"]
    model = shard(build_model(kind), mesh, extras.get("bf16_policy", False))
    optimizer = build_optimizer(config, model.parameters(), model)
    train(config, model, optimizer, parts_of(global_batches(kind), rank), make_scaler(config))
    return {"params": full_params(model), "buffers": buffers_of(model), "steps_taken": optimizer.steps_taken}


def all_reduces_in_a_step(config: str, mesh, rank: int) -> int:
    """How many times ``torch.distributed.all_reduce`` is called during step 2 of ``config`` (FSDP2
    itself all-gathers and reduce-scatters; only funcsam's reductions all-reduce)."""
    import torch.distributed as dist

    kind = CONFIGS[config][0]
    model = shard(build_model(kind), mesh)
    optimizer = build_optimizer(config, model.parameters(), model)
    batches = global_batches(kind)
    train(config, model, optimizer, parts_of(batches[:2], rank))
    original, calls = dist.all_reduce, []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        train(config, model, optimizer, parts_of(batches[2:3], rank))
    finally:
        dist.all_reduce = original
    return len(calls)


def run_checkpoint(config: str, mesh, rank: int, out_dir: str) -> dict:
    """Save with DCP after SAVED_AT steps and go on (uninterrupted); resume on both ranks from the save."""
    import torch.distributed.checkpoint as dcp

    from funcsam.checkpoint import load_sharded_state_dict, sharded_state_dict

    kind = CONFIGS[config][0]
    batches, path = global_batches(kind), os.path.join(out_dir, f"checkpoint_{config}")
    model = shard(build_model(kind), mesh)
    optimizer = build_optimizer(config, model.parameters(), model)
    train(config, model, optimizer, parts_of(batches[:SAVED_AT], rank))
    dcp.save(sharded_state_dict(model, optimizer), checkpoint_id=path)
    train(config, model, optimizer, parts_of(batches[SAVED_AT:], rank))
    uninterrupted = full_params(model)

    resumed_model = shard(build_model(kind), mesh)
    for p in resumed_model.parameters():  # so that only the checkpoint can make it right
        p.detach().to_local().normal_()
    resumed = build_optimizer(config, resumed_model.parameters(), resumed_model)
    state = sharded_state_dict(resumed_model, resumed)
    dcp.load(state, checkpoint_id=path)
    load_sharded_state_dict(resumed_model, resumed, state)
    steps_after_load = resumed.steps_taken
    train(config, resumed_model, resumed, parts_of(batches[SAVED_AT:], rank))
    return {"uninterrupted": uninterrupted, "resumed": full_params(resumed_model), "steps_after_load": steps_after_load,
            "buffers": buffers_of(model)}


# ------------------------------------------------------------------------------------------------
# Faults.

def mismatched_load(mesh, rank: int) -> dict:
    """A plain ``optimizer.state_dict()`` of sharded state, loaded where the sharding differs: plain
    params (one process) and a mesh of one rank. Returns each refusal's message and whether anything changed."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    config = "sgd_looksam"
    model = shard(build_model("mlp"), mesh)
    optimizer = build_optimizer(config, model.parameters(), model)
    train(config, model, optimizer, parts_of(global_batches("mlp")[:2], rank))
    saved = optimizer.state_dict()
    plain = build_model("mlp")
    plain_optimizer = build_optimizer(config, plain.parameters(), plain)
    train(config, plain, plain_optimizer, parts_of(global_batches("mlp")[:1], rank))
    result = _refusal(optimizer, plain_optimizer.state_dict(), "sharded_gets_plain")
    try:
        funcsam.SAMSGD(list(model.parameters()) + list(plain.parameters()), lr=0.1, rho=0.05)
        result["mixed_params"] = "accepted"
    except ValueError as error:
        result["mixed_params"] = str(error)
    alone = [dist.new_group([r], backend="gloo") for r in range(WORLD)][rank]  # every rank creates every group
    if rank != 0:
        return result
    targets = {"plain": build_model("mlp"),
               "one_rank_mesh": shard(build_model("mlp"), DeviceMesh.from_group(alone, "cpu"))}
    for name, target in targets.items():
        other = build_optimizer(config, target.parameters(), target)
        train(config, target, other, parts_of(global_batches("mlp")[:1], 0))  # some state to keep
        result.update(_refusal(other, saved, name))
    return result


def _refusal(optimizer, state_dict: dict, name: str) -> dict:
    """``{name: the ValueError's message (or "accepted"), name_unchanged: whether the state stayed as it was}``."""
    before = copy.deepcopy(optimizer.state_dict())
    try:
        optimizer.load_state_dict(state_dict)
        message = "accepted"
    except ValueError as error:
        message = str(error)
    return {name: message, name + "_unchanged": _same_state(before, optimizer.state_dict())}


def _same_state(a: dict, b: dict) -> bool:
    def flat(tree):
        if isinstance(tree, dict):
            return [x for key in sorted(tree, key=str) for x in flat(tree[key])]
        if isinstance(tree, (list, tuple)):
            return [x for item in tree for x in flat(item)]
        return [tree]
    left, right = flat(a), flat(b)
    return len(left) == len(right) and all(
        torch.equal(_whole(x), _whole(y)) if isinstance(x, torch.Tensor) else x == y for x, y in zip(left, right))


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def closure_raises(rank: int, timeout_s: float) -> dict:
    """Rank 0's closure raises at w + e. Each rank reports whether its params are back at w, the error
    it saw and how long it took (rank 1 waits in the next all-gather until the group's timeout)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    model = shard(build_model("mlp"), DeviceMesh.from_group(group, "cpu"))
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
    x, y = part(global_batches("mlp")[0], rank)
    before = [p.to_local().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if rank == 0 and len(calls) == 2:
            raise RuntimeError("the closure failed at w + e")
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    start = time.perf_counter()
    try:
        optimizer.step(closure)
        error = None
    except Exception as caught:  # noqa: BLE001 (what the rank saw is the result)
        error = f"{type(caught).__name__}: {caught}"
    elapsed = time.perf_counter() - start
    back_at_w = all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))
    return {"error": error, "seconds": elapsed, "back_at_w": back_at_w}


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (WORLD,))
    meshes = {"fsdp": mesh, "hsdp": init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))}
    result = {"configs": {}, "checkpoints": {}}
    for config in CONFIGS:
        result["configs"][config] = run_config(config, meshes, rank)
    for config in CHECKPOINTS:
        result["checkpoints"][config] = run_checkpoint(config, mesh, rank, out_dir)
    result["all_reduces"] = {config: all_reduces_in_a_step(config, mesh, rank) for config in ALL_REDUCES}
    result["mismatched_load"] = mismatched_load(mesh, rank)
    dist.barrier()
    result["closure_raises"] = closure_raises(rank, timeout_s=5.0)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # rank 1 arrives after its timeout; the default group still works
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main(sys.argv[1])
