"""The same contract on a GPU: skipped where CUDA is missing (as in CI), run on a lent GPU machine."""

import copy

import pytest
import torch
import torch.nn.functional as F

import funcsam
from helpers import assert_trees_close, bn_convnet, classification_batches, params_and_buffers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_batches(n, batch=16):
    return [(x.cuda(), y.cuda()) for x, y in classification_batches(n, batch, (3, 8, 8))]


def _functional(model, batches, step_fn, autocast_dtype=None, loss_scale=None):
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy, autocast_dtype=autocast_dtype)
    state = funcsam.init_momentum(params)
    lr, rho = torch.tensor(0.1, device="cuda"), torch.tensor(0.05, device="cuda")
    for batch in batches:
        out = step_fn(params, buffers, batch, loss_fn, rho, lr, state, momentum=0.9, weight_decay=5e-4,
                      loss_scale=loss_scale)
        params, buffers, state, loss_scale = out.params, out.buffers, out.momentum_state, out.loss_scale
    return params, buffers, out


def test_cuda_sam_step_equals_samsgd():
    model = bn_convnet().cuda()
    batches = _cuda_batches(4)
    params, buffers, _ = _functional(model, batches, funcsam.sam_step)
    adapter = copy.deepcopy(model)
    optimizer = funcsam.SAMSGD(adapter.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05, model=adapter)
    for x, y in batches:
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(adapter(x), y)
            loss.backward()
            return loss
        optimizer.step(closure)
    assert_trees_close(params, params_and_buffers(adapter)[0], atol=1e-5)
    assert_trees_close(buffers, params_and_buffers(adapter)[1], atol=1e-5)


def test_cuda_compiled_equals_eager():
    torch._dynamo.reset()
    model = bn_convnet().cuda()
    batches = _cuda_batches(3)
    compiled = _functional(model, batches, torch.compile(funcsam.sam_step, fullgraph=True))
    eager = _functional(model, batches, funcsam.sam_step)
    assert_trees_close(compiled[0], eager[0], atol=1e-5)


def test_cuda_fp16_loss_scaling_and_overflow():
    model = bn_convnet().cuda()
    batches = _cuda_batches(3)
    params, _, out = _functional(model, batches, funcsam.sam_step, torch.float16,
                                 funcsam.init_loss_scale(2.0**10, device="cuda"))
    assert bool(out.finite) and float(out.loss_scale.scale) == 2.0**10
    before = params_and_buffers(model)[0]
    _, _, overflow = _functional(model, batches[:1], funcsam.sam_step, torch.float16,
                                 funcsam.init_loss_scale(2.0**60, device="cuda"))
    assert not bool(overflow.finite) and float(overflow.loss_scale.scale) == 2.0**59
    assert_trees_close(overflow.params, before, atol=0)


def test_cuda_samsgd_with_grad_scaler():
    model = bn_convnet().cuda()
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, rho=0.05, model=model)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**60)
    x, y = _cuda_batches(1)[0]

    def closure():
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    before = params_and_buffers(model)[0]
    optimizer.step(closure, grad_scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**59 and not bool(optimizer.last_step_finite)
    assert_trees_close(params_and_buffers(model)[0], before, atol=0)


def test_cuda_bf16_runs():
    model = bn_convnet().cuda()
    params, _, out = _functional(model, _cuda_batches(2), funcsam.sam_step, torch.bfloat16)
    assert bool(out.finite) and all(p.dtype == torch.float32 for p in params.values())
