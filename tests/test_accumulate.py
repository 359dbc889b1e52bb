"""accumulated_sam_step over micro-batches against the step on the whole batch."""

import copy

import pytest
import torch
import torch.nn.functional as F

import funcsam
from helpers import (
    assert_trees_close, bn_convnet, cartesian, classification_batches, mlp, params_and_buffers, reference_sam_sgd,
    run_sam_step_with_base, torch_sgd,
)


def run_accumulated(model, batches, cut, rho, lr, **hyper):
    """Params, buffers and the last output after one accumulated step per batch, ``cut(batch)`` giving
    its micro-batches."""
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state = hyper["base"].init(params) if "base" in hyper else funcsam.init_momentum(params)
    for batch in batches:
        out = funcsam.accumulated_sam_step(params, buffers, cut(batch), loss_fn, rho, lr, state, **hyper)
        params, buffers, state = out.params, out.buffers, out.momentum_state
    return params, buffers, out


@cartesian(k=[1, 2, 4], nesterov=[False, True], adaptive=[False, True])
def test_k_micro_batches_equal_the_whole_batch_step(k, nesterov, adaptive):
    model = mlp()
    batches = classification_batches(3, 16, (6,))
    hyper = dict(momentum=0.9, weight_decay=5e-4, nesterov=nesterov, adaptive=adaptive, eta=0.01 if adaptive else 0.0)
    rho = 0.5 if adaptive else 0.05
    expected = reference_sam_sgd(model, batches, rho=rho, lr=0.1, **hyper)
    params, _, _ = run_accumulated(model, batches, lambda b: funcsam.split_batch(b, k), rho, 0.1, **hyper)
    assert_trees_close(params, expected, atol=1e-6)


@pytest.mark.parametrize("k", [2, 4])
def test_adamw_base_over_micro_batches_equals_the_whole_batch_step(k):
    model, batches, base = mlp(), classification_batches(3, 16, (6,)), funcsam.adamw(weight_decay=0.05)
    expected, _, expected_state = run_sam_step_with_base(model, batches, rho=0.05, lr=1e-2, base=base)
    params, _, out = run_accumulated(model, batches, lambda b: funcsam.split_batch(b, k), 0.05, 1e-2, base=base)
    assert_trees_close(params, expected, atol=1e-6)
    assert_trees_close(out.momentum_state.exp_avg_sq, expected_state.exp_avg_sq, atol=1e-8)


def test_unequal_micro_batches_are_weighted_by_their_size():
    model = mlp()
    batches = classification_batches(2, 16, (6,))

    def cut(batch):
        inputs, targets = batch
        return [(inputs[a:b], targets[a:b]) for a, b in [(0, 5), (5, 8), (8, 16)]]

    expected = reference_sam_sgd(model, batches, rho=0.05, lr=0.1, momentum=0.9)
    params, _, out = run_accumulated(model, batches, cut, 0.05, 0.1, momentum=0.9)
    assert_trees_close(params, expected, atol=1e-6)


def test_loss_logits_and_grad_norm_are_those_of_the_whole_batch():
    model = mlp()
    inputs, targets = classification_batches(1, 12, (6,))[0]
    _, _, out = run_accumulated(model, [(inputs, targets)], lambda b: funcsam.split_batch(b, 3), 0.05, 0.1)
    logits = model(inputs)
    loss = F.cross_entropy(logits, targets)
    grad_norm = torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(loss, model.parameters())))
    torch.testing.assert_close(out.aux, logits.detach())
    torch.testing.assert_close(out.loss, loss.detach())
    torch.testing.assert_close(out.grad_norm, grad_norm)


def test_batchnorm_statistics_follow_the_micro_batches_in_order():
    model = bn_convnet()
    batch = classification_batches(1, 12, (3, 6, 6))[0]
    micro_batches = funcsam.split_batch(batch, 3)
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        for inputs, _ in micro_batches:
            reference(inputs)
    _, buffers, _ = run_accumulated(model, [batch], lambda b: micro_batches, 0.05, 0.1, momentum=0.9)
    assert_trees_close(buffers, params_and_buffers(reference)[1], atol=1e-6)
    assert int(buffers["1.num_batches_tracked"]) == 3


def test_one_micro_batch_equals_sam_step_with_batchnorm():
    model = bn_convnet()
    batch = classification_batches(1, 8, (3, 6, 6))[0]
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state = funcsam.init_momentum(params)
    hyper = dict(momentum=0.9, weight_decay=5e-4, max_grad_norm=0.5, loss_scale=funcsam.init_loss_scale(2.0**8))
    expected = funcsam.sam_step(params, buffers, batch, loss_fn, 0.05, 0.1, state, **hyper)
    out = funcsam.accumulated_sam_step(params, buffers, [batch], loss_fn, 0.05, 0.1, state, **hyper)
    assert_trees_close(out.params, expected.params, atol=1e-6)
    assert_trees_close(out.buffers, expected.buffers, atol=1e-6)
    torch.testing.assert_close(out.loss_scale, expected.loss_scale)
    torch.testing.assert_close(out.grad_norm, expected.grad_norm)


def test_rho_zero_is_sgd_on_the_whole_batch():
    model = mlp()
    batches = classification_batches(2, 8, (6,))
    params, _, _ = run_accumulated(model, batches, lambda b: funcsam.split_batch(b, 4), 0, 0.1, momentum=0.9)
    assert_trees_close(params, torch_sgd(model, batches, lr=0.1, momentum=0.9), atol=1e-6)


def test_non_finite_micro_batch_skips_the_step():
    model = mlp()
    inputs, targets = classification_batches(1, 8, (6,))[0]
    inputs = inputs.clone()
    inputs[7, 0] = float("inf")
    params, _ = params_and_buffers(model)
    _, _, out = run_accumulated(model, [(inputs, targets)], lambda b: funcsam.split_batch(b, 2), 0.05, 0.1)
    assert not out.finite
    assert_trees_close(out.params, params, atol=0)


def test_bad_micro_batches_are_rejected_with_a_clear_error():
    model = mlp()
    batch = classification_batches(1, 10, (6,))[0]
    with pytest.raises(ValueError, match="batch size 10 is not divisible by the number of micro-batches 4"):
        funcsam.split_batch(batch, 4)
    with pytest.raises(TypeError, match="must be a list of batches"):
        run_accumulated(model, [batch], lambda b: b, 0.05, 0.1)
    with pytest.raises(ValueError, match="micro_batches is empty"):
        run_accumulated(model, [batch], lambda b: [], 0.05, 0.1)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        run_accumulated(model, [batch], lambda b: [(b[0], b[1][:3])], 0.05, 0.1)


@pytest.mark.slow
def test_traces_whole_under_torch_compile_and_equals_eager():
    # backend="eager": Dynamo must capture the whole step in one graph (fullgraph); inductor's
    # code generation is what the sam_step compile tests cover, and would cost ~20 s more here.
    torch._dynamo.reset()
    model = bn_convnet()
    batch = classification_batches(1, 8, (3, 6, 6))[0]
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    args = (params, buffers, funcsam.split_batch(batch, 2), loss_fn, torch.tensor(0.05), torch.tensor(0.1),
            funcsam.init_momentum(params))
    eager = funcsam.accumulated_sam_step(*args, momentum=0.9)
    compiled = torch.compile(funcsam.accumulated_sam_step, fullgraph=True, backend="eager")(*args, momentum=0.9)
    assert_trees_close(compiled.params, eager.params, atol=1e-5)
    assert_trees_close(compiled.buffers, eager.buffers, atol=1e-5)
