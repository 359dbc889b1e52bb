"""m_sharpness_sam_step (vmap over parts) against a Python loop over the parts written with autograd."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import funcsam
from helpers import (
    assert_trees_close, bn_convnet, cartesian, classification_batches, mlp, params_and_buffers, run_sam_step_with_base,
    torch_sgd,
)


def run_m_sharpness(model, batches, m, rho, lr, **hyper):
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state = hyper["base"].init(params) if "base" in hyper else funcsam.init_momentum(params)
    for batch in batches:
        out = funcsam.m_sharpness_sam_step(params, buffers, batch, loss_fn, rho, lr, state, m=m, **hyper)
        params, buffers, state = out.params, out.buffers, out.momentum_state
    return params, buffers, out


def loop_over_parts(model, batches, m, *, rho, lr, momentum=0.0, weight_decay=0.0, nesterov=False,
                    adaptive=False, eta=0.0, eps=1e-12):
    """m-sharpness by hand: one part at a time through the module with torch.autograd, then
    torch.optim.SGD. Running statistics: the mean over parts of each part's update from the step's
    starting statistics; num_batches_tracked advances by one."""
    model = copy.deepcopy(model)
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)

    def set_buffers(values):
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), values):
                buffer.copy_(value)

    for inputs, targets in batches:
        start = [b.clone() for b in model.buffers()]
        part_stats, sam_grads = [], [torch.zeros_like(p) for p in params]
        for x, y in zip(inputs.chunk(m), targets.chunk(m)):
            set_buffers(start)
            g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            part_stats.append([b.clone() for b in model.buffers()])
            with torch.no_grad():
                t = [p.abs() + eta if adaptive else torch.ones_like(p) for p in params]
                norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
                e = [rho * ti * ti * gi / (norm + eps) for ti, gi in zip(t, g)]
                for p, ei in zip(params, e):
                    p.add_(ei)
            set_buffers(start)
            g_sam = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            with torch.no_grad():
                for p, ei, total, gi in zip(params, e, sam_grads, g_sam):
                    p.sub_(ei)
                    total.add_(gi / m)
        set_buffers([
            torch.stack(stats).mean(0) if s.is_floating_point() else s + 1
            for s, stats in zip(start, zip(*part_stats))
        ])
        for p, g in zip(params, sam_grads):
            p.grad = g
        optimizer.step()
    return params_and_buffers(model)


@cartesian(m=[2, 4], nesterov=[False, True], adaptive=[False, True])
def test_vmap_over_parts_equals_loop_over_parts(m, nesterov, adaptive):
    model = mlp()
    batches = classification_batches(3, 16, (6,))
    hyper = dict(momentum=0.9, weight_decay=5e-4, nesterov=nesterov, adaptive=adaptive, eta=0.01 if adaptive else 0.0)
    rho = 0.5 if adaptive else 0.05
    expected, _ = loop_over_parts(model, batches, m, rho=rho, lr=0.1, **hyper)
    params, _, _ = run_m_sharpness(model, batches, m, rho, 0.1, **hyper)
    assert_trees_close(params, expected, atol=1e-6)


def test_vmap_over_parts_equals_loop_over_parts_with_batchnorm():
    model = bn_convnet()
    batches = classification_batches(3, 12, (3, 6, 6))
    expected_params, expected_buffers = loop_over_parts(model, batches, 3, rho=0.05, lr=0.1, momentum=0.9)
    params, buffers, _ = run_m_sharpness(model, batches, 3, 0.05, 0.1, momentum=0.9)
    assert_trees_close(params, expected_params, atol=1e-5)
    assert_trees_close(buffers, expected_buffers, atol=1e-5)
    assert int(buffers["1.num_batches_tracked"]) == 3


@pytest.mark.parametrize("make_model,shape", [(mlp, (6,)), (bn_convnet, (3, 6, 6))], ids=["mlp", "bn_convnet"])
def test_one_part_equals_sam_step(make_model, shape):
    model = make_model()
    batch = classification_batches(1, 8, shape)[0]
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state = funcsam.init_momentum(params)
    base = funcsam.sgd(momentum=0.9, weight_decay=5e-4)
    expected = funcsam.sam_step(params, buffers, batch, loss_fn, 0.05, 0.1, state, base=base, max_grad_norm=0.5)
    out = funcsam.sam_step(params, buffers, batch, loss_fn, 0.05, 0.1, state, base=base, max_grad_norm=0.5,
                           source=funcsam.MSharpness(1))
    assert_trees_close(out.params, expected.params, atol=1e-6)
    assert_trees_close(out.buffers, expected.buffers, atol=1e-6)
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.aux, expected.aux)
    torch.testing.assert_close(out.grad_norm, expected.grad_norm)


def test_adamw_base_with_one_part_equals_sam_step_and_rho_zero_equals_adamw():
    model, batches, base = mlp(), classification_batches(3, 16, (6,)), funcsam.adamw(weight_decay=0.05)
    expected, _, _ = run_sam_step_with_base(model, batches, rho=0.05, lr=1e-2, base=base)
    one_part, _, _ = run_m_sharpness(model, batches, 1, 0.05, 1e-2, base=base)
    assert_trees_close(one_part, expected, atol=1e-6)
    whole, _, _ = run_sam_step_with_base(model, batches, rho=0, lr=1e-2, base=base)
    parts, _, _ = run_m_sharpness(model, batches, 4, 0, 1e-2, base=base)  # rho 0: the mean of part gradients
    assert_trees_close(parts, whole, atol=1e-6)


def test_loss_and_logits_are_those_of_the_whole_batch_without_batchnorm():
    model = mlp()
    inputs, targets = classification_batches(1, 12, (6,))[0]
    _, _, out = run_m_sharpness(model, [(inputs, targets)], 3, 0.05, 0.1)
    with torch.no_grad():
        logits = model(inputs)
    torch.testing.assert_close(out.aux, logits)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, targets))
    part_norms = [
        torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(F.cross_entropy(model(x), y), model.parameters())))
        for x, y in zip(inputs.chunk(3), targets.chunk(3))
    ]
    torch.testing.assert_close(out.grad_norm, torch.stack(part_norms).mean())


def test_rho_zero_is_sgd_on_the_whole_batch():
    model = mlp()
    batches = classification_batches(2, 8, (6,))
    params, _, _ = run_m_sharpness(model, batches, 4, 0, 0.1, momentum=0.9)
    assert_trees_close(params, torch_sgd(model, batches, lr=0.1, momentum=0.9), atol=1e-6)


def test_non_finite_part_skips_the_step():
    model = mlp()
    inputs, targets = classification_batches(1, 8, (6,))[0]
    inputs = inputs.clone()
    inputs[5, 0] = float("nan")  # only the last of four parts sees it
    params, _ = params_and_buffers(model)
    _, _, out = run_m_sharpness(model, [(inputs, targets)], 4, 0.05, 0.1, momentum=0.9)
    assert not out.finite
    assert_trees_close(out.params, params, atol=0)
    assert int(out.momentum_state.count) == 0


def test_dropout_draws_differently_per_part():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.Dropout(0.5), nn.Linear(64, 3))
    inputs = torch.randn(1, 6).expand(8, 6)  # every part sees the same examples
    _, _, out = run_m_sharpness(model, [(inputs, torch.zeros(8, dtype=torch.long))], 4, 0.05, 0.1)
    assert torch.isfinite(out.loss)
    part_logits = out.aux.reshape(4, 2, 3)
    assert not any(torch.allclose(part_logits[0], part_logits[k]) for k in range(1, 4))


def test_m_that_does_not_divide_the_batch_is_rejected():
    model = mlp()
    batch = classification_batches(1, 10, (6,))[0]
    with pytest.raises(ValueError, match="batch size 10 is not divisible by the number of m-sharpness parts 4"):
        run_m_sharpness(model, [batch], 4, 0.05, 0.1)
    with pytest.raises(ValueError, match="m must be an int >= 1"):
        run_m_sharpness(model, [batch], 0, 0.05, 0.1)


@pytest.mark.slow
def test_traces_whole_under_torch_compile_and_equals_eager():
    # backend="eager": Dynamo must capture the whole step in one graph (fullgraph); inductor's
    # code generation is what the sam_step compile tests cover, and would cost ~20 s more here.
    torch._dynamo.reset()
    model = bn_convnet()
    batch = classification_batches(1, 8, (3, 6, 6))[0]
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    args = (params, buffers, batch, loss_fn, torch.tensor(0.05), torch.tensor(0.1), funcsam.init_momentum(params))
    eager = funcsam.m_sharpness_sam_step(*args, m=2, momentum=0.9)
    compiled = torch.compile(funcsam.m_sharpness_sam_step, fullgraph=True, backend="eager")(*args, m=2, momentum=0.9)
    assert_trees_close(compiled.params, eager.params, atol=1e-5)
    assert_trees_close(compiled.buffers, eager.buffers, atol=1e-5)
