"""One rank of the two-process gloo runs in test_distributed.py (started by the test, not by pytest).

    python dp_worker.py OUT_DIR first     global steps 0-1 (rank 0 checkpoints), local, accumulated,
                                          m-sharpness and non-finite runs
    python dp_worker.py OUT_DIR resume    every rank loads the checkpoint and runs global steps 2-3

Rank and world come from the environment, as torchrun sets them. Each rank saves what it computed
to OUT_DIR/<phase>_rank<r>.pt; only rank 0 writes the checkpoint and the metrics file.
"""

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import funcsam
import funcsam.distributed as fd
from helpers import bn_convnet, classification_batches, mlp, params_and_buffers

HYPER = dict(momentum=0.9, weight_decay=5e-4)
RHO, LR = 0.05, 0.1
GLOBAL_BATCH, STEPS = 16, 4


def global_batches():
    """The same global batches, in the same order, on every rank and in the test's reference."""
    return classification_batches(STEPS, GLOBAL_BATCH, (6,))


def run(params, buffers, state, loss_fn, batches, step=funcsam.sam_step, **kwargs):
    for batch in batches:
        out = step(params, buffers, batch, loss_fn, RHO, LR, state, **HYPER, **kwargs)
        params, buffers, state = out.params, out.buffers, out.momentum_state
    return params, buffers, state, out


def run_mode(mode, batches, source=None, **kwargs):
    """``STEPS`` steps of ``mode`` on ``batches`` (MLP, SGD with HYPER), deciding on the host each step."""
    model = mlp()
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    params, buffers = params_and_buffers(model)
    base = funcsam.sgd(**HYPER)
    state = funcsam.modes.check_mode(mode).init_state(base, params)
    for t, batch in enumerate(batches):
        out = funcsam.sam_step(params, buffers, batch, loss_fn, RHO, LR, state, base=base, mode=mode, source=source,
                               take_sam=funcsam.modes.check_mode(mode).takes_sam(t, state), **kwargs)
        params, buffers, state = out.params, out.buffers, out.momentum_state
    return params


# The modes on real replicas, and the references the test computes in one process for each.
MODE_RUNS = {
    # global sync: one process on the global batch
    "gsam_global": (lambda: funcsam.GSAM(0.5), None, "global", None),
    # local sync: each replica is an m-sharpness part of the global batch
    "aesam_local": (lambda: funcsam.AESAM(total_steps=STEPS), None, "local", 2),
    # m-sharpness on each replica: world x m parts
    "looksam_m_sharpness": (lambda: funcsam.LookSAM(k=2), 2, "global", 4),
}


def first(out_dir, reduce):
    model = mlp()
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    params, buffers = params_and_buffers(model)
    shards = [fd.local_shard(batch) for batch in global_batches()]
    result = {}

    g_params, g_buffers, g_state, out = run(
        params, buffers, funcsam.init_momentum(params), loss_fn, shards[:2], grad_reduce=reduce, sam_sync="global"
    )
    if fd.is_main_process():
        torch.save({"params": g_params, "buffers": g_buffers, "momentum_state": g_state, "step": 2},
                   os.path.join(out_dir, "checkpoint.pt"))
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": 2, "loss": out.loss.item()}) + "\n")
    result["global_two_steps"] = g_params

    result["local"] = run(
        params, buffers, funcsam.init_momentum(params), loss_fn, shards[:3], grad_reduce=reduce, sam_sync="local"
    )[0]
    micro = [funcsam.split_batch(shard, 2) for shard in shards[:2]]
    result["accumulated_global"] = run(
        params, buffers, funcsam.init_momentum(params), loss_fn, micro,
        step=funcsam.accumulated_sam_step, grad_reduce=reduce, sam_sync="global",
    )[0]
    result["m_sharpness_local"] = run(
        params, buffers, funcsam.init_momentum(params), loss_fn, shards[:2],
        step=funcsam.m_sharpness_sam_step, m=2, grad_reduce=reduce,
    )[0]

    for name, (mode, parts, sync, _) in MODE_RUNS.items():
        source = None if parts is None else funcsam.MSharpness(parts)
        result[name] = run_mode(mode(), shards, source, grad_reduce=reduce, sam_sync=sync)

    # Rank 1's first gradient overflows: every rank must skip, or the replicas drift apart.
    inputs, targets = shards[0]
    if dist.get_rank() == 1:
        inputs = inputs.clone()
        inputs[0, 0] = float("inf")
    out = funcsam.sam_step(params, buffers, (inputs, targets), loss_fn, RHO, LR, funcsam.init_momentum(params),
                           **HYPER, grad_reduce=reduce, sam_sync="local")
    result["non_finite"] = {"finite": out.finite, "params": out.params}

    # A BatchNorm model: replicas keep their own running statistics unless synchronised.
    bn_model = bn_convnet()
    bn_loss_fn = funcsam.make_loss_fn(bn_model, F.cross_entropy)
    bn_params, bn_buffers = params_and_buffers(bn_model)
    images = classification_batches(1, GLOBAL_BATCH, (3, 6, 6))[0]
    result["bn_local_buffers"] = funcsam.sam_step(
        bn_params, bn_buffers, fd.local_shard(images), bn_loss_fn, RHO, LR, funcsam.init_momentum(bn_params),
        grad_reduce=reduce,
    ).buffers
    sync_model = fd.convert_sync_batchnorm(bn_convnet())
    sync_loss_fn = funcsam.make_loss_fn(sync_model, F.cross_entropy)
    result["sync_bn"] = run(
        bn_params, bn_buffers, funcsam.init_momentum(bn_params), sync_loss_fn,
        [fd.local_shard(batch) for batch in bn_global_batches()], grad_reduce=reduce, sam_sync="global",
    )[:2]
    return result


def bn_global_batches():
    return classification_batches(2, GLOBAL_BATCH, (3, 6, 6), seed=2)


def resume(out_dir, reduce):
    checkpoint = torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=False)
    loss_fn = funcsam.make_loss_fn(mlp(), F.cross_entropy)
    shards = [fd.local_shard(batch) for batch in global_batches()[checkpoint["step"]:]]
    params = run(checkpoint["params"], checkpoint["buffers"], checkpoint["momentum_state"], loss_fn, shards,
                 grad_reduce=reduce, sam_sync="global")[0]
    return {"global_resumed": params}


def main():
    out_dir, phase = sys.argv[1], sys.argv[2]
    dp = fd.init_data_parallel(timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    reduce = fd.all_reduce_mean()
    result = first(out_dir, reduce) if phase == "first" else resume(out_dir, reduce)
    result["is_main"] = dp.is_main
    torch.save(result, os.path.join(out_dir, f"{phase}_rank{dp.rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
