"""Small models, data and independent reference computations shared by the tests."""

from __future__ import annotations

import copy
import itertools
import math
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


def assert_trees_equal(a: dict, b: dict):
    """Bit for bit, in the tensors' own dtype (``assert_trees_close`` compares in float32)."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


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


def torch_optimizer(model, batches, optimizer_class, **hyper):
    """Params after ``optimizer_class`` (any torch.optim class) over ``batches`` with cross-entropy,
    on a copy of ``model``."""
    model = copy.deepcopy(model)
    optimizer = optimizer_class(model.parameters(), **hyper)
    for inputs, targets in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return params_and_buffers(model)[0]


def run_sam_step_with_base(model, batches, *, rho, lr, base, mode=None, loss_scale=None, autocast_dtype=None,
                           **options):
    """Params, buffers and state after ``sam_step(..., base=base, mode=mode)`` over ``batches`` (model
    left untouched), each step taking SAM where ``mode.takes_sam(step, state)`` says; ``loss_scale``
    (a LossScaleState) is carried from step to step, ``autocast_dtype`` goes to make_loss_fn."""
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy, autocast_dtype=autocast_dtype)
    mode = funcsam.modes.check_mode(mode)
    state = mode.init_state(base, params)
    for step, batch in enumerate(batches):
        out = funcsam.sam_step(params, buffers, batch, loss_fn, rho, lr, state, base=base, mode=mode,
                               take_sam=mode.takes_sam(step, state), loss_scale=loss_scale, **options)
        params, buffers, state, loss_scale = out.params, out.buffers, out.momentum_state, out.loss_scale
    return params, buffers, state


ADAPTER_STYLES = ["first_second", "davda54_closure", "closure"]


def adapter_steps(model, optimizer, batches, style, after_step=None, *, scaler=None, autocast_dtype=None):
    """Trains ``model`` in place with a SAM optimizer in one of the ``ADAPTER_STYLES``:

    first_second     backward; first_step(zero_grad=True); backward; second_step(zero_grad=True)
    davda54_closure  backward; step(closure that only computes and backpropagates); zero_grad()
    closure          step(closure that zeroes, computes and backpropagates), as sam.pytorch

    In the closure style, ``autocast_dtype`` runs the forward under CPU autocast and ``scaler`` (a
    ``torch.amp.GradScaler``) scales the loss, is passed to the step and updated after it.
    Returns how many times each step called its closure.
    """
    calls = []
    for inputs, targets in batches:
        def loss(inputs=inputs, targets=targets):
            with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
                return F.cross_entropy(model(inputs), targets)

        count = []
        if style == "first_second":
            loss().backward()
            optimizer.first_step(zero_grad=True)
            loss().backward()
            optimizer.second_step(zero_grad=True)
        elif style == "davda54_closure":
            def closure():
                count.append(1)
                value = loss()
                value.backward()
                return value
            loss().backward()
            optimizer.step(closure)
            optimizer.zero_grad()
        elif style == "closure":
            def closure():
                count.append(1)
                optimizer.zero_grad()
                value = loss()
                (value if scaler is None else scaler.scale(value)).backward()
                return value
            optimizer.step(closure, grad_scaler=scaler)
            if scaler is not None:
                scaler.update()
        else:
            raise ValueError(style)
        calls.append(len(count))
        if after_step is not None:
            after_step()
    return calls


def reference_sam(model, batches, *, rho, descend, eps=1e-12, max_grad_norm=None):
    """SAM over any base optimizer, written out by hand with torch.autograd, one tensor at a time.

    ``rho`` is a float or a dict name -> rho (param groups; the gradient norm stays global).
    ``descend(step, name, p, g, state)`` applies the base optimizer's update to ``p`` in place, with
    ``state`` a dict of its own for each parameter. The perturbed pass runs the module itself and
    its BatchNorm updates are put back, so buffers hold the first pass's statistics. With
    ``max_grad_norm`` the SAM gradient is clipped by its global norm (coefficient
    min(1, max_grad_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_).
    Returns ``(params, buffers)`` of a trained copy of ``model``.
    """
    model = copy.deepcopy(model)
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    rhos = rho if isinstance(rho, dict) else {name: rho for name in names}
    states = {name: {} for name in names}

    def gradient(inputs, targets):
        return torch.autograd.grad(F.cross_entropy(model(inputs), targets), params)

    for step, (inputs, targets) in enumerate(batches):
        g = gradient(inputs, targets)
        first_pass_buffers = [b.clone() for b in model.buffers()]
        with torch.no_grad():
            w = [p.clone() for p in params]
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
            for name, p, gi in zip(names, params, g):
                p.add_(rhos[name] * gi / (norm + eps))
        g_sam = gradient(inputs, targets)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), first_pass_buffers):
                b.copy_(saved)
            for p, wi in zip(params, w):
                p.copy_(wi)
            if max_grad_norm is not None:
                sam_norm = torch.sqrt(sum((gi ** 2).sum() for gi in g_sam))
                g_sam = [gi * min(1.0, max_grad_norm / (float(sam_norm) + 1e-6)) for gi in g_sam]
            for name, p, gi in zip(names, params, g_sam):
                descend(step, name, p, gi, states[name])
    return params_and_buffers(model)


def adamw_by_hand(*, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, lr_factor=None):
    """A ``descend`` for :func:`reference_sam`: torch.optim.AdamW's update of one tensor.

    ``lr`` is a float or a dict name -> lr; ``lr_factor(step)`` multiplies it (a schedule)::

        w = w * (1 - lr * wd);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  v_max = max(v_max, v)
        w = w - lr / (1 - b1^t) * m / (sqrt(v or v_max) / sqrt(1 - b2^t) + eps)
    """
    beta1, beta2 = betas

    def descend(step, name, p, g, state):
        step_lr = (lr[name] if isinstance(lr, dict) else lr) * (1.0 if lr_factor is None else lr_factor(step))
        t = step + 1
        if not state:
            state.update(m=torch.zeros_like(p), v=torch.zeros_like(p), v_max=torch.zeros_like(p))
        p.mul_(1 - step_lr * weight_decay)
        state["m"] = beta1 * state["m"] + (1 - beta1) * g
        state["v"] = beta2 * state["v"] + (1 - beta2) * g * g
        state["v_max"] = torch.maximum(state["v_max"], state["v"])
        v = state["v_max"] if amsgrad else state["v"]
        p.sub_(step_lr / (1 - beta1 ** t) * state["m"] / (v.sqrt() / math.sqrt(1 - beta2 ** t) + eps))

    return descend
