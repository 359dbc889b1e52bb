"""Small models, data and independent reference computations shared by the tests."""

from __future__ import annotations

import copy
import itertools
import os
import socket
import subprocess

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import funcsam


def cartesian(**axes):
    """``pytest.mark.parametrize`` over the cartesian product of ``axes``, with readable ids."""
    names = list(axes)
    values = list(itertools.product(*axes.values()))
    ids = ["-".join(f"{n}={v}" for n, v in zip(names, combo)) for combo in values]
    return pytest.mark.parametrize(",".join(names), values, ids=ids)


def mlp(seed: int = 0, d_in: int = 6, hidden: int = 8, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def bn_convnet(seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes),
    )


def classification_batches(n_batches: int, batch: int, shape, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(n_batches)
    ]


def params_and_buffers(model: nn.Module):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    return params, buffers


def torch_sgd(model, batches, **hyper):
    """Params after torch.optim.SGD over ``batches`` with cross-entropy, on a copy of ``model``."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), **hyper)
    for inputs, targets in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return params_and_buffers(model)[0]


def run_sam_step(model, batches, rho, lr, **hyper):
    """Params and buffers after ``sam_step`` over ``batches`` (model left untouched)."""
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state = funcsam.init_momentum(params)
    for batch in batches:
        out = funcsam.sam_step(params, buffers, batch, loss_fn, rho, lr, state, **hyper)
        params, buffers, state = out.params, out.buffers, out.momentum_state
    return params, buffers


def run_samsgd(model, batches, keep_first_pass_bn=True, **hyper):
    """Params and buffers after ``SAMSGD`` over ``batches`` on a copy of ``model``."""
    model = copy.deepcopy(model)
    optimizer = funcsam.SAMSGD(model.parameters(), model=model if keep_first_pass_bn else None, **hyper)
    for inputs, targets in batches:
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            return loss
        optimizer.step(closure)
    return params_and_buffers(model)


def assert_trees_close(a: dict, b: dict, atol: float, rtol: float = 0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")


def reference_sam_sgd(model, batches, *, rho, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                      nesterov=False, adaptive=False, eta=0.0, eps=1e-12):
    """SAM + torch.optim.SGD written out by hand with torch.autograd, one tensor at a time.

    Independent of funcsam: no torch.func, no foreach, no pytrees. BN-free models only (the
    perturbed pass runs the module itself).
    """
    model = copy.deepcopy(model)
    params = list(model.parameters())
    buffers = [None] * len(params)

    def gradient(inputs, targets):
        loss = F.cross_entropy(model(inputs), targets)
        return torch.autograd.grad(loss, params)

    for step, (inputs, targets) in enumerate(batches):
        g = gradient(inputs, targets)
        with torch.no_grad():
            if adaptive:
                t = [p.abs() + eta for p in params]
                norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
                e = [rho * ti * ti * gi / (norm + eps) for ti, gi in zip(t, g)]
            else:
                norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
                e = [rho * gi / (norm + eps) for gi in g]
            for p, ei in zip(params, e):
                p.add_(ei)
        g_sam = gradient(inputs, targets)
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.sub_(ei)
            for i, (p, gi) in enumerate(zip(params, g_sam)):
                d = gi + weight_decay * p
                if momentum:
                    buffers[i] = d.clone() if buffers[i] is None else momentum * buffers[i] + (1 - dampening) * d
                    d = d + momentum * buffers[i] if nesterov else buffers[i]
                p.sub_(lr * d)
    return {k: v.detach() for k, v in model.named_parameters()}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_gloo_ranks(argv: list, world: int, timeout: float, cwd=None, extra_env=None) -> list:
    """Run ``world`` copies of ``argv`` as the ranks of one gloo job on 127.0.0.1, as torchrun would.

    Each gets RANK/LOCAL_RANK/WORLD_SIZE, a free loopback port, one thread and no GPU; all are
    killed after ``timeout`` seconds. ``extra_env`` adds variables (a None value removes one).
    Returns one ``subprocess.CompletedProcess`` per rank.
    """
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                   OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        for key, value in (extra_env or {}).items():  # None removes an inherited variable
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            for proc, (out, err) in zip(procs, outputs)]
