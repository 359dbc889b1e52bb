"""Misuse of sam_step, SAMSGD and SAM: each becomes a clear error, or leaves everything as it was."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

import funcsam
from helpers import assert_trees_equal, bn_convnet, classification_batches, mlp, params_and_buffers

NAN, INF = math.nan, math.inf


def _linear_problem(dtype=torch.float32):
    """Params of a linear least-squares model, its loss_fn and a batch: the smallest valid sam_step input."""
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 3, generator=g, dtype=dtype), "b": torch.randn(5, generator=g, dtype=dtype)}
    batch = (torch.randn(4, 3, generator=g, dtype=dtype), torch.randn(4, 5, generator=g, dtype=dtype))

    def loss_fn(params, buffers, batch):
        inputs, targets = batch
        return ((inputs @ params["w"].T + params["b"] - targets) ** 2).mean(), (buffers, None)

    return params, loss_fn, batch


def _sam_step(params, loss_fn, batch, state=None, rho=0.05, lr=0.1, **kwargs):
    state = funcsam.init_momentum(params) if state is None else state
    return funcsam.sam_step(params, {}, batch, loss_fn, rho, lr, state, **kwargs)


def _optimizers(model):
    return {
        "samsgd": funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, rho=0.05, model=model),
        "sam_adamw": funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, model=model),
    }


def _closure(optimizer, model, batch, fail_on_call=None):
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == fail_on_call:
            raise KeyboardInterrupt("interrupted in the perturbed pass")
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        return loss

    return closure


# --- the parameters come back to w whatever happens -----------------------------------------------


@pytest.mark.parametrize("kind", ["samsgd", "sam_adamw"])
def test_closure_raising_in_perturbed_pass_leaves_params_and_buffers_at_w(kind):
    model = bn_convnet()
    batch = classification_batches(1, 4, (3, 5, 5))[0]
    optimizer = _optimizers(model)[kind]
    before = params_and_buffers(model)
    with pytest.raises(KeyboardInterrupt):
        optimizer.step(_closure(optimizer, model, batch, fail_on_call=2))
    assert_trees_equal(params_and_buffers(model)[0], before[0])
    assert_trees_equal(params_and_buffers(model)[1], before[1])  # the closure style knew the pre-step buffers
    optimizer.step(_closure(optimizer, model, batch))  # and the optimizer is usable afterwards
    assert bool(optimizer.last_step_finite)


def test_davda54_closure_raising_leaves_sam_params_at_w():
    model = mlp()
    inputs, targets = classification_batches(1, 8, (6,))[0]
    optimizer = funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
    before = params_and_buffers(model)[0]
    F.cross_entropy(model(inputs), targets).backward()

    def closure():
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        optimizer.step(closure)
    assert_trees_equal(params_and_buffers(model)[0], before)


@pytest.mark.parametrize("kind", ["samsgd", "sam_adamw"])
def test_second_step_without_gradient_raises_with_params_at_w(kind):
    model = mlp()
    inputs, targets = classification_batches(1, 8, (6,))[0]
    optimizer = _optimizers(model)[kind]
    before = params_and_buffers(model)[0]
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.first_step(zero_grad=True)
    assert not torch.equal(model[0].weight, before["0.weight"])  # perturbed
    with pytest.raises(RuntimeError, match="w \\+ e"):
        optimizer.second_step()  # no backward at w + e
    assert_trees_equal(params_and_buffers(model)[0], before)


@pytest.mark.parametrize("with_model", [True, False])
def test_closure_leaving_params_without_gradient_at_w_plus_e_names_them(with_model):
    model = mlp()
    inputs, targets = classification_batches(1, 8, (6,))[0]
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, rho=0.05, model=model if with_model else None)
    before = params_and_buffers(model)[0]
    calls = []

    def closure():  # the second call backpropagates through the last layer only
        calls.append(1)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs) if len(calls) == 1 else model[2](torch.randn(8, 8)), targets)
        loss.backward()
        return loss

    named = (r"0\.weight of shape \(8, 6\), 0\.bias of shape \(8,\)" if with_model
             else r"param group 0, index 0 of shape \(8, 6\), param group 0, index 1 of shape \(8,\)")
    with pytest.raises(RuntimeError, match=rf"2 parameter\(s\) had a gradient at w but none at w \+ e \({named}\)"):
        optimizer.step(closure)
    assert_trees_equal(params_and_buffers(model)[0], before)


def test_samsgd_with_model_keeps_bn_buffers_on_non_finite_step():
    model = bn_convnet()
    inputs, targets = classification_batches(1, 4, (3, 5, 5))[0]
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, rho=0.05, model=model)
    optimizer.step(_closure(optimizer, model, (inputs, targets)))
    before = params_and_buffers(model)
    inputs = inputs.clone()
    inputs[1, 2, 3, 4] = NAN
    optimizer.step(_closure(optimizer, model, (inputs, targets)))
    assert not bool(optimizer.last_step_finite)
    params, buffers = params_and_buffers(model)
    assert bool(torch.isfinite(buffers["1.running_mean"]).all())
    assert int(buffers["1.num_batches_tracked"]) == 1
    assert_trees_equal(buffers, before[1])
    assert_trees_equal(params, before[0])


@pytest.mark.parametrize("kind", ["samsgd", "sam_adamw"])
def test_closure_without_backward_is_refused(kind):
    model = mlp()
    inputs, targets = classification_batches(1, 8, (6,))[0]
    optimizer = _optimizers(model)[kind]
    with pytest.raises(RuntimeError, match="backward"):
        optimizer.step(lambda: F.cross_entropy(model(inputs), targets))


# --- hyperparameters ------------------------------------------------------------------------------

BAD_SCALARS = [
    ("rho", INF), ("rho", NAN), ("lr", INF), ("lr", NAN),
    ("rho", torch.tensor(INF)), ("rho", torch.tensor(NAN)), ("lr", torch.tensor(INF)),
]
BAD_SCALAR_IDS = [f"{name}={'tensor ' if isinstance(v, torch.Tensor) else ''}{float(v)}" for name, v in BAD_SCALARS]


@pytest.mark.parametrize("name,value", BAD_SCALARS, ids=BAD_SCALAR_IDS)
def test_non_finite_rho_or_lr_is_refused_by_name(name, value):
    params, loss_fn, batch = _linear_problem()
    good = dict(rho=0.05, lr=0.1)
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        _sam_step(params, loss_fn, batch, **{**good, name: value})
    model = mlp()
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        funcsam.SAMSGD(model.parameters(), **{**good, name: value})
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        funcsam.SAM(model.parameters(), torch.optim.AdamW, **{**good, name: value})


def test_shorthand_with_base_is_refused():
    params, loss_fn, batch = _linear_problem()
    base = funcsam.adamw()
    with pytest.raises(ValueError, match="momentum given together with base="):
        _sam_step(params, loss_fn, batch, base.init(params), base=base, momentum=0.9)
    with pytest.raises(ValueError, match="momentum given together with base="):
        funcsam.accumulated_sam_step(params, {}, [batch], loss_fn, 0.05, 0.1, base.init(params), base=base,
                                     momentum=0.9)


def test_sam_refuses_an_optimizer_instance_or_a_funcsam_base():
    model = mlp()
    with pytest.raises(TypeError, match="not an instance"):
        funcsam.SAM(model.parameters(), torch.optim.AdamW(model.parameters(), lr=1e-3))
    with pytest.raises(TypeError, match=re.escape("torch.optim.Optimizer class")):
        funcsam.SAM(model.parameters(), funcsam.adamw())


# --- the state -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_buffer,what", [
    (torch.zeros(2, 5), "shape (2, 5)"),
    (torch.zeros(5, dtype=torch.float64), "torch.float64"),
])
def test_mismatched_momentum_buffer_is_refused_with_its_path(bad_buffer, what):
    params, loss_fn, batch = _linear_problem()
    state = funcsam.init_momentum(params)
    state = state._replace(momentum_buffer={**state.momentum_buffer, "b": bad_buffer})
    with pytest.raises(ValueError, match=re.escape("momentum_state.momentum_buffer[b]")) as error:
        _sam_step(params, loss_fn, batch, state, momentum=0.9)
    assert what in str(error.value) and "base.init(params)" in str(error.value)


def test_state_of_another_base_is_a_type_error():
    params, loss_fn, batch = _linear_problem()
    with pytest.raises(TypeError, match=re.escape("base.init(params)")):
        _sam_step(params, loss_fn, batch, funcsam.adamw().init(params), momentum=0.9)
    with pytest.raises(TypeError, match=re.escape("base.init(params)")):
        _sam_step(params, loss_fn, batch, funcsam.init_momentum(params), base=funcsam.adamw())


@pytest.mark.parametrize("base", [funcsam.sgd(momentum=0.9), funcsam.adamw()], ids=["sgd", "adamw"])
def test_params_that_require_grad_give_detached_outputs(base):
    model = mlp()
    params = dict(model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state = base.init(params)
    for batch in classification_batches(2, 8, (6,)):
        out = funcsam.sam_step(params, {}, batch, loss_fn, 0.05, 0.1, state, base=base)
        params, state = out.params, out.momentum_state
    leaves = [*params.values(), *state.momentum_buffer.values()] if isinstance(state, funcsam.MomentumState) \
        else [*params.values(), *state.exp_avg.values(), *state.exp_avg_sq.values()]
    assert all(not t.requires_grad and t.grad_fn is None for t in leaves)
    assert all(not p.requires_grad for p in (out.loss, out.grad_norm))


# --- batches and losses ---------------------------------------------------------------------------


def test_empty_batch_is_refused():
    params, loss_fn, (inputs, targets) = _linear_problem()
    with pytest.raises(ValueError, match="batch is empty"):
        _sam_step(params, loss_fn, (inputs[:0], targets[:0]))
    micro_batches = [(inputs[:2], targets[:2]), (inputs[:0], targets[:0])]
    with pytest.raises(ValueError, match=re.escape("micro_batches[1] is empty")):
        funcsam.accumulated_sam_step(params, {}, micro_batches, loss_fn, 0.05, 0.1, funcsam.init_momentum(params))


def test_a_batch_without_targets_says_what_make_loss_fn_takes():
    model = mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    inputs, targets = classification_batches(1, 8, (6,))[0]
    for batch, got in ((inputs, r"a tensor of shape \(8, 6\)"), ((inputs, targets, targets), "a tuple of 3")):
        with pytest.raises(TypeError, match=r"batch = \(inputs, targets\), got " + got):
            funcsam.sam_step(params, {}, batch, loss_fn, 0.05, 0.1, funcsam.init_momentum(params))
    with pytest.raises(TypeError, match="source=funcsam.MicroBatches"):  # a list of batches, without the source
        funcsam.sam_step(params, {}, [(inputs, targets)] * 3, loss_fn, 0.05, 0.1, funcsam.init_momentum(params))


def test_options_given_twice_are_refused_naming_them():
    params, loss_fn, batch = _linear_problem()
    with pytest.raises(ValueError, match="max_grad_norm given together with options="):
        _sam_step(params, loss_fn, batch, options=funcsam.SAMOptions(), max_grad_norm=1.0)
    with pytest.raises(TypeError, match="options must be a funcsam.SAMOptions"):
        _sam_step(params, loss_fn, batch, options=dict(adaptive=True))
    with pytest.raises(TypeError, match="adaptive must be a bool"):
        _sam_step(params, loss_fn, batch, options=funcsam.SAMOptions(adaptive="yes"))


@pytest.mark.parametrize("base", [funcsam.sgd(momentum=0.9), funcsam.adamw()], ids=["sgd", "adamw"])
def test_nan_loss_with_finite_gradients_skips_the_step(base):
    params, loss_fn, batch = _linear_problem()

    def nan_loss_fn(params, buffers, batch):
        loss, rest = loss_fn(params, buffers, batch)
        return loss + torch.tensor(NAN), rest  # the constant has no gradient: g stays finite

    state = base.init(params)
    out = _sam_step(params, nan_loss_fn, batch, state, base=base)
    assert not bool(out.finite) and bool(torch.isfinite(out.grad_norm))
    assert_trees_equal(out.params, params)
    assert int(out.momentum_state.count) == 0


@pytest.mark.parametrize("output", ["loss", "loss_and_logits", "flat_triple"])
def test_loss_fn_of_the_wrong_form_shows_the_expected_form(output):
    params, loss_fn, batch = _linear_problem()

    def wrong_loss_fn(params, buffers, batch):
        loss = loss_fn(params, buffers, batch)[0]
        logits = batch[0] @ params["w"].T
        return {"loss": loss, "loss_and_logits": (loss, logits), "flat_triple": (loss, buffers, logits)}[output]

    with pytest.raises(TypeError, match=re.escape("(loss, (new_buffers, aux))")):
        _sam_step(params, wrong_loss_fn, batch)


def test_int_loss_is_a_type_error():
    params, _, batch = _linear_problem()
    with pytest.raises(TypeError, match="0-dim floating-point loss"):
        _sam_step(params, lambda p, buffers, b: (3, (buffers, None)), batch)
    with pytest.raises(TypeError, match="0-dim floating-point loss"):
        _sam_step(params, lambda p, buffers, b: (torch.tensor(3), (buffers, None)), batch)


def test_detached_loss_says_it_does_not_depend_on_the_params():
    params, loss_fn, batch = _linear_problem()
    detached = lambda p, buffers, b: (loss_fn(p, buffers, b)[0].detach(), (buffers, None))  # noqa: E731
    with pytest.raises(ValueError, match="does not depend on the params"):
        _sam_step(params, detached, batch)


def test_int_leaf_in_params_is_named_with_its_dtype():
    params, loss_fn, batch = _linear_problem()
    state = funcsam.init_momentum(params)
    params = {**params, "w": params["w"].long()}
    for call in (lambda: _sam_step(params, loss_fn, batch, state), lambda: funcsam.init_momentum(params)):
        with pytest.raises(TypeError, match=re.escape("params[w] is a tensor of dtype torch.int64")):
            call()


# --- loss scaling and gradient reduction ----------------------------------------------------------


def test_float_loss_scale_names_loss_scale_state():
    params, loss_fn, batch = _linear_problem()
    with pytest.raises(TypeError, match="LossScaleState"):
        _sam_step(params, loss_fn, batch, loss_scale=1024.0)


def test_float_grad_scaler_names_grad_scaler_and_leaves_params():
    model = mlp()
    batch = classification_batches(1, 8, (6,))[0]
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, rho=0.05)
    before = params_and_buffers(model)[0]
    with pytest.raises(TypeError, match="GradScaler"):
        optimizer.step(_closure(optimizer, model, batch), grad_scaler=1024.0)
    assert_trees_equal(params_and_buffers(model)[0], before)


@pytest.mark.parametrize("reduce", [
    lambda grads: grads[:-1],
    lambda grads: grads + [grads[0]],
    lambda grads: [g.reshape(-1) for g in grads],
], ids=["fewer", "more", "reshaped"])
def test_grad_reduce_of_the_wrong_form_is_named(reduce):
    params, loss_fn, batch = _linear_problem()
    with pytest.raises(ValueError, match="grad_reduce must return one tensor per gradient"):
        _sam_step(params, loss_fn, batch, grad_reduce=reduce)


# --- checkpoints ----------------------------------------------------------------------------------


def _trained_state_dict(optimizer_class, model, **hyper):
    optimizer = optimizer_class(model.parameters(), **hyper)
    inputs, targets = classification_batches(1, 8, (6,))[0]
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    return copy.deepcopy(optimizer.state_dict())


def _trained_samsgd(model):
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
    optimizer.step(_closure(optimizer, model, classification_batches(1, 8, (6,))[0]))
    return optimizer


def test_adam_state_into_samsgd_is_refused_and_changes_nothing():
    model = mlp()
    optimizer = _trained_samsgd(model)
    before = copy.deepcopy(optimizer.state_dict())
    adam_state = _trained_state_dict(torch.optim.Adam, copy.deepcopy(model), lr=1e-3)
    with pytest.raises(ValueError, match="another optimizer"):
        optimizer.load_state_dict(adam_state)
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for key, state in before["state"].items():
        assert torch.equal(after["state"][key]["momentum_buffer"], state["momentum_buffer"])
        assert torch.equal(after["state"][key]["step"], state["step"])


def test_samsgd_state_with_negative_lr_is_refused():
    model = mlp()
    state = copy.deepcopy(_trained_samsgd(model).state_dict())
    state["param_groups"][0]["lr"] = -1.0
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        optimizer.load_state_dict(state)
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_sgd_state_into_sam_adamw_is_refused():
    model = mlp()
    sgd_state = _trained_state_dict(torch.optim.SGD, copy.deepcopy(model), lr=0.1, momentum=0.9)
    optimizer = funcsam.SAM(model.parameters(), torch.optim.AdamW, lr=1e-3)
    with pytest.raises(ValueError, match="not a state of AdamW"):
        optimizer.load_state_dict(sgd_state)
    assert optimizer.state_dict()["state"] == {}


def test_torch_sgd_state_into_samsgd_still_loads():
    model = mlp()
    sgd_state = _trained_state_dict(torch.optim.SGD, copy.deepcopy(model), lr=0.2, momentum=0.9)
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, rho=0.07)
    optimizer.load_state_dict(sgd_state)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["rho"], group["adaptive"]) == (0.2, 0.07, False)
    for p, index in zip(model.parameters(), sgd_state["state"]):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], sgd_state["state"][index]["momentum_buffer"])
