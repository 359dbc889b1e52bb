"""The pure base optimizers (funcsam.sgd / adam / adamw) against torch.optim, and their validation."""

import math
import re

import pytest
import torch

import funcsam
from funcsam.base import flatten_state, unflatten_state
from funcsam.tree import flatten, unflatten
from helpers import cartesian

SHAPES = {"layer": {"weight": (4, 3), "bias": (4,)}, "scale": (2, 1, 3)}
STEPS = 20


def _random_tree(generator):
    return {"layer": {"weight": torch.randn(4, 3, generator=generator, dtype=torch.float64),
                      "bias": torch.randn(4, generator=generator, dtype=torch.float64)},
            "scale": torch.randn(2, 1, 3, generator=generator, dtype=torch.float64)}


def _schedule(lr: float, lr_kind: str):
    """``lr`` at each step: constant as a float, or a 0-dim tensor that decays every step."""
    if lr_kind == "float":
        return [lr] * STEPS
    return [torch.tensor(lr * 0.9 ** step, dtype=torch.float64) for step in range(STEPS)]


def _compare_with_torch(base, torch_class, torch_hyper, lr, lr_kind):
    """Runs ``base.update`` and ``torch_class`` side by side on the same random gradients."""
    generator = torch.Generator().manual_seed(0)
    params = _random_tree(generator)
    leaves, spec = flatten(params)
    reference = [torch.nn.Parameter(leaf.clone()) for leaf in leaves]
    optimizer = torch_class(reference, lr=lr, **torch_hyper)
    state = base.init(params)
    for step_lr in _schedule(lr, lr_kind):
        grads = flatten(_random_tree(generator))[0]
        flat = flatten_state(base, state, params, spec, flatten(params)[0])
        new_leaves, flat = base.update(flatten(params)[0], grads, flat, step_lr)
        params, state = unflatten(spec, new_leaves), unflatten_state(spec, flat)

        optimizer.param_groups[0]["lr"] = float(step_lr)
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        optimizer.step()

    assert int(state.count) == STEPS
    for got, expected in zip(flatten(params)[0], reference):
        torch.testing.assert_close(got, expected.detach(), atol=1e-6, rtol=0)


@cartesian(momentum=[0.0, 0.9], dampening=[0.0, 0.3], nesterov=[False, True], weight_decay=[0.0, 1e-2],
           lr_kind=["float", "tensor"])
def test_sgd_update_matches_torch_sgd(momentum, dampening, nesterov, weight_decay, lr_kind):
    if nesterov and (momentum == 0 or dampening != 0):
        pytest.skip("torch.optim.SGD refuses nesterov without momentum or with dampening")
    hyper = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
    _compare_with_torch(funcsam.sgd(**hyper), torch.optim.SGD, hyper, 0.1, lr_kind)


@cartesian(decoupled=[False, True], amsgrad=[False, True], weight_decay=[0.0, 0.1],
           betas=[(0.9, 0.999), (0.5, 0.9)], lr_kind=["float", "tensor"])
def test_adam_and_adamw_updates_match_torch(decoupled, amsgrad, weight_decay, betas, lr_kind):
    hyper = dict(betas=betas, eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad)
    factory, torch_class = (funcsam.adamw, torch.optim.AdamW) if decoupled else (funcsam.adam, torch.optim.Adam)
    _compare_with_torch(factory(**hyper), torch_class, hyper, 0.1, lr_kind)


def test_adamw_default_weight_decay_is_torchs():
    assert funcsam.adamw().weight_decay == torch.optim.AdamW([torch.zeros(1)]).defaults["weight_decay"] == 1e-2
    assert funcsam.adam().weight_decay == 0.0


def test_states_start_at_zero_and_amsgrad_carries_a_maximum():
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    adam_state = funcsam.adamw(amsgrad=True).init(params)
    assert isinstance(adam_state, funcsam.AdamState) and int(adam_state.count) == 0
    assert adam_state.count.dtype == torch.int64
    for field in (adam_state.exp_avg, adam_state.exp_avg_sq, adam_state.max_exp_avg_sq):
        assert {k: (v.shape, float(v.abs().sum())) for k, v in field.items()} == {
            k: (v.shape, 0.0) for k, v in params.items()}
    assert funcsam.adam().init(params).max_exp_avg_sq is None
    sgd_state = funcsam.sgd(momentum=0.9).init(params)
    assert isinstance(sgd_state, funcsam.MomentumState) and int(sgd_state.count) == 0


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("factory,kwargs,error,name", [
    (funcsam.sgd, dict(momentum=-0.1), ValueError, "momentum"),
    (funcsam.sgd, dict(momentum=NAN), ValueError, "momentum"),
    (funcsam.sgd, dict(momentum=INF), ValueError, "momentum"),
    (funcsam.sgd, dict(dampening=-1.0), ValueError, "dampening"),
    (funcsam.sgd, dict(dampening=NAN), ValueError, "dampening"),
    (funcsam.sgd, dict(weight_decay=-1e-4), ValueError, "weight_decay"),
    (funcsam.sgd, dict(weight_decay=INF), ValueError, "weight_decay"),
    (funcsam.sgd, dict(momentum=0.9, nesterov=1), TypeError, "nesterov"),
    (funcsam.sgd, dict(momentum=0.9, nesterov="yes"), TypeError, "nesterov"),
    (funcsam.sgd, dict(nesterov=True), ValueError, "nesterov"),
    (funcsam.sgd, dict(momentum=0.9, dampening=0.1, nesterov=True), ValueError, "nesterov"),
    (funcsam.sgd, dict(momentum="0.9"), TypeError, "momentum"),
    (funcsam.adam, dict(betas=(1.0, 0.999)), ValueError, "betas[0]"),
    (funcsam.adamw, dict(betas=(0.9, 1.0)), ValueError, "betas[1]"),
    (funcsam.adamw, dict(betas=(0.9, 1.5)), ValueError, "betas[1]"),
    (funcsam.adam, dict(betas=(-0.1, 0.999)), ValueError, "betas[0]"),
    (funcsam.adamw, dict(betas=(NAN, 0.999)), ValueError, "betas[0]"),
    (funcsam.adamw, dict(betas=(0.9, INF)), ValueError, "betas[1]"),
    (funcsam.adam, dict(betas=0.9), TypeError, "betas"),
    (funcsam.adam, dict(betas=(0.9, 0.99, 0.999)), TypeError, "betas"),
    (funcsam.adam, dict(eps=0.0), ValueError, "eps"),
    (funcsam.adamw, dict(eps=-1e-8), ValueError, "eps"),
    (funcsam.adamw, dict(eps=NAN), ValueError, "eps"),
    (funcsam.adamw, dict(eps=INF), ValueError, "eps"),
    (funcsam.adam, dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (funcsam.adamw, dict(weight_decay=NAN), ValueError, "weight_decay"),
    (funcsam.adamw, dict(weight_decay=INF), ValueError, "weight_decay"),
    (funcsam.adam, dict(amsgrad=1), TypeError, "amsgrad"),
    (funcsam.adamw, dict(amsgrad="False"), TypeError, "amsgrad"),
])
def test_factory_rejects_bad_hyperparameter_by_name(factory, kwargs, error, name):
    with pytest.raises(error, match=re.escape(name)):
        factory(**kwargs)


@pytest.mark.parametrize("factory", [funcsam.sgd, funcsam.adam, funcsam.adamw])
def test_uncalled_factory_as_base_says_to_call_it(factory):
    params = {"w": torch.randn(3)}
    loss_fn = lambda p, b, batch: ((p["w"] ** 2).sum(), (b, None))  # noqa: E731
    with pytest.raises(TypeError, match=re.escape(f"funcsam.{factory.__name__}()")):
        funcsam.sam_step(params, {}, None, loss_fn, 0.05, 0.1, funcsam.init_momentum(params), base=factory)
