"""Mixed precision: bf16 autocast, and fp16 with dynamic loss scaling in both APIs."""

import copy

import pytest
import torch
import torch.nn.functional as F

import funcsam
from helpers import assert_trees_close, classification_batches, mlp, params_and_buffers


def _sam_step_fp16(model, batch, loss_scale, dtype=torch.float16):
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy, autocast_dtype=dtype)
    return params, funcsam.sam_step(params, buffers, batch, loss_fn, 0.05, 0.1, funcsam.init_momentum(params),
                                    momentum=0.9, loss_scale=loss_scale)


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    batch = classification_batches(1, 8, (6,))[0]
    # 2**40 times the loss overflows fp16 (max 65504) in the backward of the autocast matmuls.
    params, out = _sam_step_fp16(mlp(), batch, funcsam.init_loss_scale(2.0**40))
    assert not bool(out.finite)
    assert float(out.loss_scale.scale) == 2.0**39
    assert int(out.loss_scale.growth_tracker) == 0
    assert_trees_close(out.params, params, atol=0)
    assert int(out.momentum_state.count) == 0
    assert bool(torch.isfinite(out.loss))


def test_fp16_with_a_sane_scale_matches_fp32():
    model = mlp()
    batch = classification_batches(1, 8, (6,))[0]
    _, scaled = _sam_step_fp16(model, batch, funcsam.init_loss_scale(2.0**10))
    _, fp32 = _sam_step_fp16(model, batch, None, dtype=None)
    assert bool(scaled.finite)
    assert int(scaled.loss_scale.growth_tracker) == 1 and float(scaled.loss_scale.scale) == 2.0**10
    assert_trees_close(scaled.params, fp32.params, atol=2e-3)


def test_loss_scale_grows_after_the_interval_and_backs_off():
    state = funcsam.init_loss_scale(8.0, growth_interval=3)
    finite, overflow = torch.tensor(True), torch.tensor(False)
    scales = []
    for flag in [finite, finite, finite, finite, overflow, finite]:
        state = funcsam.update_loss_scale(state, flag)
        scales.append((float(state.scale), int(state.growth_tracker)))
    assert scales == [(8.0, 1), (8.0, 2), (16.0, 0), (16.0, 1), (8.0, 0), (8.0, 1)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(init_scale=0.0), "init_scale"),
    (dict(growth_factor=1.0), "growth_factor"),
    (dict(backoff_factor=1.0), "backoff_factor"),
    (dict(growth_interval=0), "growth_interval"),
])
def test_bad_loss_scale_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        funcsam.init_loss_scale(**kwargs)


def _samsgd_fp16_step(model, batch, scaler):
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
    inputs, targets = batch

    def closure():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(inputs), targets)
        scaler.scale(loss).backward()
        return loss

    loss = optimizer.step(closure, grad_scaler=scaler)
    scaler.update()
    return optimizer, loss


def test_samsgd_with_grad_scaler_skips_overflow_and_backs_off():
    model = mlp()
    before = params_and_buffers(model)[0]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    optimizer, _ = _samsgd_fp16_step(model, classification_batches(1, 8, (6,))[0], scaler)
    assert not bool(optimizer.last_step_finite)
    assert scaler.get_scale() == 2.0**39
    assert_trees_close(params_and_buffers(model)[0], before, atol=0)


def test_samsgd_with_grad_scaler_equals_sam_step_with_loss_scale():
    model = mlp()
    batch = classification_batches(1, 8, (6,))[0]
    _, functional = _sam_step_fp16(model, batch, funcsam.init_loss_scale(2.0**10, growth_interval=1))
    adapter_model = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    optimizer, _ = _samsgd_fp16_step(adapter_model, batch, scaler)
    assert bool(optimizer.last_step_finite)
    assert scaler.get_scale() == float(functional.loss_scale.scale) == 2.0**11
    assert_trees_close(params_and_buffers(adapter_model)[0], functional.params, atol=1e-6)


def test_bf16_autocast_runs_and_stays_near_fp32():
    model = mlp()
    batch = classification_batches(1, 8, (6,))[0]
    _, bf16 = _sam_step_fp16(model, batch, None, dtype=torch.bfloat16)
    _, fp32 = _sam_step_fp16(model, batch, None, dtype=None)
    assert bool(bf16.finite)
    assert all(v.dtype == torch.float32 for v in bf16.params.values())
    assert_trees_close(bf16.params, fp32.params, atol=5e-3)
