"""torch.compile: the pure step compiles whole, once, and computes what eager computes."""

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import funcsam
from helpers import assert_trees_close, bn_convnet, classification_batches, params_and_buffers


def _train(step_fn, model, batches, lrs, rhos, loss_scale=None, memory_format="auto"):
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy, memory_format=memory_format)
    state = funcsam.init_momentum(params)
    for batch, lr, rho in zip(batches, lrs, rhos):
        out = step_fn(params, buffers, batch, loss_fn, torch.tensor(rho), torch.tensor(lr), state,
                      momentum=0.9, weight_decay=5e-4, nesterov=True, max_grad_norm=5.0, loss_scale=loss_scale)
        params, buffers, state, loss_scale = out.params, out.buffers, out.momentum_state, out.loss_scale
    return params, buffers, state


def test_changing_lr_and_rho_compile_once_with_no_graph_break():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(funcsam.sam_step, backend=counter, fullgraph=True)
    lrs = [0.1 * (1 - i / 10) for i in range(10)]
    rhos = [0.05 + 0.01 * i for i in range(10)]
    _train(step, bn_convnet(), classification_batches(10, 4, (3, 6, 6)), lrs, rhos,
           loss_scale=funcsam.init_loss_scale())
    assert counter.frame_count == 1


@pytest.mark.slow
def test_compiled_sam_step_equals_eager_after_three_steps():
    torch._dynamo.reset()
    model = bn_convnet()
    batches = classification_batches(3, 8, (3, 6, 6))
    lrs, rhos = [0.1, 0.05, 0.02], [0.05, 0.1, 0.2]
    compiled = _train(torch.compile(funcsam.sam_step, fullgraph=True), model, batches, lrs, rhos)
    eager = _train(funcsam.sam_step, model, batches, lrs, rhos)
    assert_trees_close(compiled[0], eager[0], atol=1e-5)
    assert_trees_close(compiled[1], eager[1], atol=1e-5)
    assert_trees_close(compiled[2].momentum_buffer, eager[2].momentum_buffer, atol=1e-5)


def test_loss_fn_computing_in_channels_last_compiles_whole_and_equals_eager():
    """make_loss_fn(memory_format=) is for the step compiled whole: one frame, no graph break, the
    eager numbers (the graph run by dynamo's counting backend; inductor's layout is bench's matter)."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(funcsam.sam_step, backend=counter, fullgraph=True)
    model, batches = bn_convnet(), classification_batches(3, 4, (3, 6, 6))
    lrs, rhos = [0.1, 0.05, 0.02], [0.05, 0.1, 0.2]
    compiled = _train(step, model, batches, lrs, rhos, memory_format=torch.channels_last)
    eager = _train(funcsam.sam_step, model, batches, lrs, rhos)
    assert counter.frame_count == 1
    assert_trees_close(compiled[0], eager[0], atol=1e-5)
    assert_trees_close(compiled[1], eager[1], atol=1e-5)


def test_model_without_buffers_compiles():
    from helpers import mlp

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(funcsam.sam_step, backend=counter, fullgraph=True)
    model = mlp()
    compiled = _train(step, model, classification_batches(3, 4, (6,)), [0.1, 0.05, 0.02], [0.05, 0.1, 0.2])
    eager = _train(funcsam.sam_step, model, classification_batches(3, 4, (6,)), [0.1, 0.05, 0.02], [0.05, 0.1, 0.2])
    assert counter.frame_count == 1
    assert compiled[1] == {}
    assert_trees_close(compiled[0], eager[0], atol=1e-6)


def test_alternating_tensor_rho_and_the_number_zero_keeps_two_graphs():
    """A schedule of SAM steps (tensor rho) and base steps (the Python number 0): torch.compile makes
    the number symbolic when it recompiles, and the argument checks must trace it."""
    from helpers import mlp

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(funcsam.sam_step, backend=counter, fullgraph=True)
    model, batches = mlp(), classification_batches(6, 4, (6,))
    params, _ = params_and_buffers(model)
    expected = dict(params)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state = expected_state = funcsam.init_momentum(params)
    for i, batch in enumerate(batches):
        rho = torch.tensor(0.05 + 0.01 * i) if i % 2 == 0 else 0
        out = step(params, {}, batch, loss_fn, rho, torch.tensor(0.1), state, momentum=0.9)
        ref = funcsam.sam_step(expected, {}, batch, loss_fn, rho, torch.tensor(0.1), expected_state, momentum=0.9)
        params, state, expected, expected_state = out.params, out.momentum_state, ref.params, ref.momentum_state
    assert counter.frame_count == 2
    assert_trees_close(params, expected, atol=1e-6)
