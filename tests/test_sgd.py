"""The descent half: with rho = 0 both APIs must be torch.optim.SGD, to the letter."""

import pytest
import torch
import torch.nn.functional as F

import funcsam
from helpers import assert_trees_close, cartesian, classification_batches, mlp, params_and_buffers, run_samsgd, run_sam_step, torch_sgd

HYPER = cartesian(momentum=[0.0, 0.9], dampening=[0.0, 0.3], weight_decay=[0.0, 5e-4], nesterov=[False, True])


RUN = {
    "sam_step": lambda model, batches, hyper: run_sam_step(model, batches, 0.0, 0.1, **hyper)[0],
    "SAMSGD": lambda model, batches, hyper: run_samsgd(model, batches, lr=0.1, rho=0.0, **hyper)[0],
}


@HYPER
@pytest.mark.parametrize("api", list(RUN))
def test_rho_zero_matches_torch_sgd_over_ten_steps(api, momentum, dampening, weight_decay, nesterov):
    if nesterov and (momentum == 0 or dampening != 0):
        pytest.skip("torch.optim.SGD rejects nesterov without momentum or with dampening")
    model = mlp()
    batches = classification_batches(10, 16, (6,))
    hyper = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    expected = torch_sgd(model, batches, lr=0.1, **hyper)
    assert_trees_close(RUN[api](model, batches, hyper), expected, atol=1e-6)


def test_rho_zero_with_tensor_lr_matches_torch_sgd():
    model = mlp()
    batches = classification_batches(10, 16, (6,))
    expected = torch_sgd(model, batches, lr=0.05, momentum=0.9, weight_decay=1e-3)
    params, _ = run_sam_step(model, batches, 0.0, torch.tensor(0.05), momentum=0.9, weight_decay=1e-3)
    assert_trees_close(params, expected, atol=1e-6)


def test_rho_zero_takes_one_pass():
    model = mlp()
    calls = []
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)

    def counting_loss_fn(*args):
        calls.append(1)
        return loss_fn(*args)

    params, buffers = params_and_buffers(model)
    batch = classification_batches(1, 4, (6,))[0]
    funcsam.sam_step(params, buffers, batch, counting_loss_fn, 0.0, 0.1, funcsam.init_momentum(params))
    assert len(calls) == 1
    funcsam.sam_step(params, buffers, batch, counting_loss_fn, 0.05, 0.1, funcsam.init_momentum(params))
    assert len(calls) == 3


def test_sgd_direction_first_step_tensor_and_bool_agree():
    g = [torch.randn(3), torch.randn(2, 2)]
    p = [torch.randn(3), torch.randn(2, 2)]
    bufs = [torch.zeros(3), torch.zeros(2, 2)]
    kw = dict(momentum=0.9, dampening=0.5, weight_decay=0.1, nesterov=False)
    d_bool, b_bool = funcsam.sgd_direction(p, g, bufs, first_step=True, **kw)
    d_tensor, b_tensor = funcsam.sgd_direction(p, g, bufs, first_step=torch.tensor(True), **kw)
    for a, b in zip(d_bool + b_bool, d_tensor + b_tensor):
        torch.testing.assert_close(a, b)
    # The first buffer is the (weight-decayed) gradient itself, without dampening: SGD's clone.
    torch.testing.assert_close(b_bool[0], g[0] + 0.1 * p[0])
