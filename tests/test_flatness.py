"""SAM's point: from the same start it ends at a flatter minimum than SGD.

The problem is a two-layer linear network y = x W1 W2 fitted to a linear target from an unbalanced
start (W1 large, W2 small). Gradient descent keeps the layers unbalanced and lands on a sharp point of
the valley of minima; SAM's ascent step pushes towards the flat, balanced part. Sharpness is the top
eigenvalue of the Hessian, by power iteration on Hessian-vector products (forward-over-reverse).
"""

import pytest
import torch
from torch.func import grad, jvp

import funcsam
import funcsam.engine


def _problem():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 4, generator=g)
    targets = inputs @ torch.randn(4, 1, generator=g)
    start = {"w1": 2.0 * torch.eye(4), "w2": 0.1 * torch.randn(4, 1, generator=g)}

    def loss(params):
        return ((inputs @ params["w1"] @ params["w2"] - targets) ** 2).mean()

    return loss, start


def top_hessian_eigenvalue(loss, params, iterations=100):
    gradient = grad(loss)
    v = {k: torch.ones_like(t) for k, t in params.items()}
    eigenvalue = torch.tensor(0.0)
    for _ in range(iterations):
        norm = torch.sqrt(sum((t ** 2).sum() for t in v.values()))
        v = {k: t / norm for k, t in v.items()}
        _, hv = jvp(gradient, (params,), (v,))
        eigenvalue = sum((hv[k] * v[k]).sum() for k in v)
        v = hv
    return float(eigenvalue)


def _train(rho, steps=500, lr=0.02):
    loss, params = _problem()
    state = funcsam.init_momentum(params)

    def loss_fn(params, buffers, batch):
        return loss(params), (buffers, ())

    for _ in range(steps):
        out = funcsam.sam_step(params, {}, None, loss_fn, rho, lr, state)
        params, state = out.params, out.momentum_state
    return float(loss(params)), top_hessian_eigenvalue(loss, params)


def test_power_iteration_finds_the_top_eigenvalue():
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    quadratic = lambda p: 0.5 * p["x"] @ a @ p["x"]  # noqa: E731
    assert top_hessian_eigenvalue(quadratic, {"x": torch.zeros(2)}) == pytest.approx(float(torch.linalg.eigvalsh(a)[-1]), rel=1e-4)


def test_sam_ends_flatter_than_sgd_from_the_same_start():
    sgd_loss, sgd_sharpness = _train(rho=0.0)
    sam_loss, sam_sharpness = _train(rho=0.1)
    assert sgd_loss < 1e-3 and sam_loss < 1e-2, "both must reach the valley of minima"
    assert sam_sharpness < 0.75 * sgd_sharpness


def test_a_perturbation_with_the_wrong_sign_does_not_flatten(monkeypatch):
    """The flatness test can fail: descending instead of ascending gives no flatter point."""
    correct = funcsam.engine.perturbation_and_norm

    def wrong_sign(*args, **kwargs):
        e, norm = correct(*args, **kwargs)
        return [-x for x in e], norm

    monkeypatch.setattr(funcsam.engine, "perturbation_and_norm", wrong_sign)
    _, sgd_sharpness = _train(rho=0.0)
    _, descending_sharpness = _train(rho=0.1)
    assert descending_sharpness > 0.9 * sgd_sharpness
