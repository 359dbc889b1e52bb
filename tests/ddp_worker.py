"""One rank of the two-process gloo job in test_ddp.py (started by the test, not by pytest).

    python ddp_worker.py OUT_DIR

Every configuration of the drop-in optimizers under DistributedDataParallel (SAM/SAMSGD x call
style x mode x sam_sync) runs ``STEPS`` steps on this rank's shards of the same global batches, and
the rank saves the parameters each ended with in OUT_DIR/rank<r>.pt, beside the non-finite, bad
input, raising closure and compiled-hook cases. The test recomputes each in one process.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import funcsam
import funcsam.distributed as fd
from helpers import classification_batches, mlp, params_and_buffers

LR, RHO, ASAM_RHO = 0.1, 0.05, 0.5
HYPER = dict(momentum=0.9, weight_decay=5e-4)
GLOBAL_BATCH, STEPS = 16, 4
RAISE_TIMEOUT_S = 2

# name -> (mode factory, adaptive); the modes' parameters make every kind of step happen in 4 steps.
MODES = {
    "sam": (lambda: None, False),
    "asam": (lambda: None, True),
    "every2": (lambda: funcsam.every(2), False),
    "late2": (lambda: funcsam.late(2), False),
    "looksam": (lambda: funcsam.LookSAM(k=2, alpha=0.7), False),
    "msam": (lambda: funcsam.MSAM(), False),
    "gsam": (lambda: funcsam.GSAM(alpha=0.5), False),
    "aesam": (lambda: funcsam.AESAM(total_steps=STEPS), False),
}
TWO_HALVES_MODES = ("sam", "asam", "gsam")


def configurations():
    """(optimizer, style, mode name, sam_sync): closure for both optimizers, davda54's closure
    (the gradient at w computed before step) for SAM, first/second step where the mode fits it,
    and the closure with a GradScaler."""
    for sync in ("global", "local"):
        for mode in MODES:
            yield "samsgd", "closure", mode, sync
            yield "sam", "closure", mode, sync
            yield "sam", "davda54_closure", mode, sync
            if mode in TWO_HALVES_MODES:
                yield "samsgd", "first_second", mode, sync
                yield "sam", "first_second", mode, sync
        # fp16's loss scaling (here without autocast): both passes scaled, the gradients unscaled.
        yield "samsgd", "closure_scaler", "sam", sync
        yield "sam", "closure_scaler", "gsam", sync


def config_name(optimizer, style, mode, sync) -> str:
    return f"{optimizer}-{style}-{mode}-{sync}"


def global_batches():
    """The same global batches, in the same order, on every rank and in the test's reference."""
    return classification_batches(STEPS, GLOBAL_BATCH, (6,))


def make_optimizer(kind: str, model: nn.Module, ddp: nn.Module, mode_name: str, sync: str):
    mode, adaptive = MODES[mode_name]
    common = dict(rho=ASAM_RHO if adaptive else RHO, adaptive=adaptive, model=ddp, mode=mode(), sam_sync=sync)
    if kind == "samsgd":
        return funcsam.SAMSGD(model.parameters(), lr=LR, **HYPER, **common)
    return funcsam.SAM(model.parameters(), torch.optim.SGD, lr=LR, **HYPER, **common)


def ddp_step(ddp, optimizer, batch, style: str, local: bool, second_batch=None):
    """One step in ``style``; ``second_batch`` (default ``batch``) feeds the pass at w + e."""
    second_batch = batch if second_batch is None else second_batch

    def loss(data=batch):
        return F.cross_entropy(ddp(data[0]), data[1])

    first_sync = ddp.no_sync() if local else _nothing()
    if style == "first_second":
        with first_sync:
            loss().backward()
        optimizer.first_step(zero_grad=True)
        loss(second_batch).backward()
        optimizer.second_step(zero_grad=True)
        return
    calls = []
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if style == "closure_scaler" else None

    def closure():
        data = batch if not calls else second_batch
        calls.append(1)
        if style != "davda54_closure":
            optimizer.zero_grad()
        value = loss(data)
        (value if scaler is None else scaler.scale(value)).backward()
        return value

    if style == "davda54_closure":  # the caller's own backward at w: under no_sync() for local perturbation
        calls.append(1)
        with first_sync:
            loss().backward()
        optimizer.step(closure)
        optimizer.zero_grad()
    else:
        optimizer.step(closure, grad_scaler=scaler)
        if scaler is not None:
            scaler.update()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def run_configurations(shards):
    results = {}
    for kind, style, mode, sync in configurations():
        model = mlp()
        ddp = DDP(model)
        optimizer = make_optimizer(kind, model, ddp, mode, sync)
        for batch in shards:
            ddp_step(ddp, optimizer, batch, style, sync == "local")
        results[config_name(kind, style, mode, sync)] = params_and_buffers(model)[0]
    # Global perturbation with the inner module as model=: it works the same (buffers are the same tensors).
    model = mlp()
    ddp = DDP(model)
    optimizer = funcsam.SAMSGD(model.parameters(), lr=LR, **HYPER, rho=RHO, model=model)
    for batch in shards:
        ddp_step(ddp, optimizer, batch, "closure", False)
    results["inner_module_global"] = params_and_buffers(model)[0]
    return results


class FmaxLinear(nn.Module):
    """Logits ``fmax(fc(x), -1)``: fmax drops NaN, so with NaN weights (w + e after a NaN ||g||) the
    loss is finite and every gradient 0. A replica whose own first gradient is non-finite then
    computes a finite gradient at w + e, and only the spread of its verdict through DDP's reduction
    keeps the other replica from stepping alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return torch.fmax(self.fc(x), torch.tensor(-1.0))


def non_finite_on_one_rank(shard):
    """Rank 1's first pass sees a NaN input (its g is NaN), its pass at w + e a finite one."""
    poisoned = shard[0].clone()
    if dist.get_rank() == 1:
        poisoned[0, 0] = float("nan")
    results = {}
    for kind, style in (("samsgd", "closure"), ("sam", "first_second"), ("sam", "davda54_closure")):
        model = FmaxLinear()
        ddp = DDP(model)
        optimizer = make_optimizer(kind, model, ddp, "sam", "local")
        ddp_step(ddp, optimizer, (poisoned, shard[1]), style, True, second_batch=shard)
        results[f"{kind}-{style}"] = dict(finite=optimizer.last_step_finite.clone(),
                                          params=params_and_buffers(model)[0])
    return results


def wrongly_synchronised_passes(shard):
    """The first/second-step style with backward passes that contradict sam_sync: refused, params at w."""
    results = {}
    for name, sync, first_local, second_local in (("local_first_synced", "local", False, False),
                                                  ("global_first_unsynced", "global", True, False),
                                                  ("second_unsynced", "global", False, True)):
        model = mlp()
        ddp = DDP(model)
        optimizer = make_optimizer("sam", model, ddp, "sam", sync)
        message = ""
        try:
            with ddp.no_sync() if first_local else _nothing():
                F.cross_entropy(ddp(shard[0]), shard[1]).backward()
            optimizer.first_step(zero_grad=True)
            with ddp.no_sync() if second_local else _nothing():
                F.cross_entropy(ddp(shard[0]), shard[1]).backward()
            optimizer.second_step(zero_grad=True)
        except RuntimeError as err:
            message = str(err)
        results[name] = dict(message=message, params=params_and_buffers(model)[0])
    return results


def compiled_hook(shards):
    """sam_step with grad_reduce=all_reduce_mean() under torch.compile(fullgraph=True), a backend
    that keeps the traced graph's ops and runs it eagerly: the collectives it traced, and the params."""
    traced_ops = set()

    def recording_backend(graph_module, example_inputs):
        traced_ops.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module

    model = mlp()
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    reduce = fd.all_reduce_mean()

    def step(params, buffers, state, batch, lr, rho):
        out = funcsam.sam_step(params, buffers, batch, loss_fn, rho, lr, state, **HYPER, grad_reduce=reduce,
                               sam_sync="global")
        return out.params, out.buffers, out.momentum_state

    compiled = torch.compile(step, backend=recording_backend, fullgraph=True)
    params, buffers = params_and_buffers(model)
    state = funcsam.init_momentum(params)
    lr, rho = torch.tensor(LR), torch.tensor(RHO)
    for batch in shards[:2]:
        params, buffers, state = compiled(params, buffers, state, batch, lr, rho)
    return dict(params=params, ops=sorted(traced_ops))


def raising_closure(shard):
    """Rank 1's closure raises at w + e; rank 0 waits in DDP's reduction until the group's timeout."""
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=RAISE_TIMEOUT_S))
    model = mlp()
    ddp = DDP(model, process_group=group)
    optimizer = make_optimizer("samsgd", model, ddp, "sam", "global")
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2 and dist.get_rank() == 1:
            raise ValueError("closure failed on rank 1")
        optimizer.zero_grad()
        loss = F.cross_entropy(ddp(shard[0]), shard[1])
        loss.backward()
        return loss

    message = ""
    try:
        optimizer.step(closure)
    except Exception as err:  # noqa: BLE001 (rank 0 sees gloo's timeout, rank 1 its own ValueError)
        message = f"{type(err).__name__}: {err}"
    return dict(message=message, params=params_and_buffers(model)[0])


def main():
    out_dir = sys.argv[1]
    dp = fd.init_data_parallel(timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    shards = [fd.local_shard(batch) for batch in global_batches()]
    result = run_configurations(shards)
    result["non_finite"] = non_finite_on_one_rank(shards[0])
    result["wrong_sync"] = wrongly_synchronised_passes(shards[0])
    result["compiled_hook"] = compiled_hook(shards)
    result["raising_closure"] = raising_closure(shards[0])
    torch.save(result, os.path.join(out_dir, f"rank{dp.rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
