"""funcsam.SAM over torch.optim optimizers, and sam_step over funcsam.adam/adamw, against hand references.

Models run in float64: Adam normalises each coordinate by its own gradient scale, so float32 noise
in a near-zero gradient (a conv bias before BatchNorm) would be amplified to a full-size update.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import funcsam
from helpers import (
    ADAPTER_STYLES, adamw_by_hand, adapter_steps, assert_trees_close, assert_trees_equal, bn_convnet, cartesian,
    classification_batches, mlp, params_and_buffers, reference_sam, run_sam_step_with_base, torch_optimizer,
)

ADAMW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


def _mlp_and_batches(n_batches):
    batches = classification_batches(n_batches, 8, (6,))
    return mlp().double(), [(x.double(), y) for x, y in batches]


def _convnet_and_batches(n_batches):
    batches = classification_batches(n_batches, 6, (3, 5, 5))
    return bn_convnet().double(), [(x.double(), y) for x, y in batches]


def _adapter(model, batches, style, base_class, **kwargs):
    """Params and buffers of a copy of ``model`` trained with ``funcsam.SAM(..., base_class, **kwargs)``."""
    model = copy.deepcopy(model)
    optimizer = funcsam.SAM(model.parameters(), base_class, **kwargs)
    adapter_steps(model, optimizer, batches, style)
    return params_and_buffers(model)


# --- rho = 0 is the base optimizer ------------------------------------------------------------------

BASES = {
    "sgd": (torch.optim.SGD, funcsam.sgd, dict(momentum=0.9, nesterov=True, weight_decay=1e-3), 0.05),
    "adamw": (torch.optim.AdamW, funcsam.adamw, dict(betas=(0.9, 0.99), weight_decay=0.05), 1e-2),
    "adam": (torch.optim.Adam, funcsam.adam, dict(betas=(0.8, 0.99), weight_decay=1e-3, amsgrad=True), 1e-2),
}


@cartesian(base=list(BASES), api=["sam_step_number", "sam_step_tensor", *ADAPTER_STYLES])
def test_rho_zero_matches_torch_optimizer(base, api):
    torch_class, factory, hyper, lr = BASES[base]
    model, batches = _mlp_and_batches(20)
    expected = torch_optimizer(model, batches, torch_class, lr=lr, **hyper)
    if api.startswith("sam_step"):
        rho = 0 if api == "sam_step_number" else torch.tensor(0.0)
        params, _, state = run_sam_step_with_base(model, batches, rho=rho, lr=lr, base=factory(**hyper))
        assert int(state.count) == 20
    else:
        params, _ = _adapter(model, batches, api, torch_class, rho=0.0, lr=lr, **hyper)
    assert_trees_close(params, expected, atol=1e-6)


# --- SAM over RMSprop ----------------------------------------------------------------------------


def _rmsprop_by_hand(*, lr, alpha, eps, weight_decay, momentum, centered):
    """torch.optim.RMSprop's update of one tensor (its documented algorithm)::

        g = g + wd w;  s = alpha s + (1 - alpha) g^2;  a = alpha a + (1 - alpha) g  (centered)
        d = sqrt(s - a^2) + eps  (centered)  or  sqrt(s) + eps
        b = momentum b + g / d;  w = w - lr b       (momentum > 0)   or   w = w - lr g / d
    """
    def descend(step, name, p, g, state):
        if not state:
            state.update(square_avg=torch.zeros_like(p), grad_avg=torch.zeros_like(p), buf=torch.zeros_like(p))
        g = g + weight_decay * p
        state["square_avg"] = alpha * state["square_avg"] + (1 - alpha) * g * g
        if centered:
            state["grad_avg"] = alpha * state["grad_avg"] + (1 - alpha) * g
            denominator = (state["square_avg"] - state["grad_avg"] ** 2).sqrt() + eps
        else:
            denominator = state["square_avg"].sqrt() + eps
        if momentum > 0:
            state["buf"] = momentum * state["buf"] + g / denominator
            p.sub_(lr * state["buf"])
        else:
            p.sub_(lr * g / denominator)

    return descend


@cartesian(momentum=[0.0, 0.9], centered=[False, True], style=["first_second", "closure"])
def test_sam_over_rmsprop_matches_hand_reference(momentum, centered, style):
    model, batches = _mlp_and_batches(8)
    hyper = dict(lr=1e-2, alpha=0.9, eps=1e-8, weight_decay=1e-3, momentum=momentum, centered=centered)
    expected, _ = reference_sam(model, batches, rho=0.05, descend=_rmsprop_by_hand(**hyper))
    params, _ = _adapter(model, batches, style, torch.optim.RMSprop, rho=0.05, **hyper)
    assert_trees_close(params, expected, atol=1e-6)


# --- SAM over AdamW: functional, adapter (three styles) and by hand ---------------------------------


@cartesian(model_kind=["mlp", "bn_convnet"], amsgrad=[False, True])
def test_sam_adamw_agrees_across_apis_and_with_hand_reference(model_kind, amsgrad):
    model, batches = _mlp_and_batches(5) if model_kind == "mlp" else _convnet_and_batches(4)
    hyper = dict(ADAMW, amsgrad=amsgrad)
    expected = reference_sam(model, batches, rho=0.05, descend=adamw_by_hand(**hyper))
    lr, rest = hyper["lr"], {k: v for k, v in hyper.items() if k != "lr"}
    params, buffers, _ = run_sam_step_with_base(model, batches, rho=0.05, lr=lr, base=funcsam.adamw(**rest))
    results = {"sam_step": (params, buffers)}
    for style in ADAPTER_STYLES:
        trained = copy.deepcopy(model)
        optimizer = funcsam.SAM(trained.parameters(), torch.optim.AdamW, rho=0.05, model=trained, **hyper)
        adapter_steps(trained, optimizer, batches, style)
        results[style] = params_and_buffers(trained)
    for params, buffers in results.values():
        assert_trees_close(params, expected[0], atol=1e-5)
        assert_trees_close(buffers, expected[1], atol=1e-5)
    if model_kind == "bn_convnet":  # the buffers did move: the comparison above was not vacuous
        assert int(expected[1]["1.num_batches_tracked"]) == len(batches)


def test_sam_adamw_param_groups_match_hand_reference_with_global_norm():
    model, batches = _mlp_and_batches(4)
    groups = {"first": dict(names=["0.weight", "0.bias"], lr=1e-2, rho=0.02),
              "second": dict(names=["2.weight", "2.bias"], lr=3e-3, rho=0.5)}
    lr = {name: group["lr"] for group in groups.values() for name in group["names"]}
    rho = {name: group["rho"] for group in groups.values() for name in group["names"]}
    rest = dict(betas=(0.9, 0.99), weight_decay=0.05)
    expected, _ = reference_sam(model, batches, rho=rho, descend=adamw_by_hand(lr=lr, **rest))
    for style in ("first_second", "closure"):
        trained = copy.deepcopy(model)
        named = dict(trained.named_parameters())
        optimizer = funcsam.SAM(
            [{"params": [named[n] for n in g["names"]], "lr": g["lr"], "rho": g["rho"]} for g in groups.values()],
            torch.optim.AdamW, rho=0.1, lr=1.0, **rest,
        )
        adapter_steps(trained, optimizer, batches, style)
        assert_trees_close(params_and_buffers(trained)[0], expected, atol=1e-6)


# --- learning-rate schedules ----------------------------------------------------------------------


@pytest.mark.parametrize("style", ADAPTER_STYLES)
def test_lr_scheduler_on_sam_drives_the_base_optimizer_without_order_warning(style):
    model, batches = _mlp_and_batches(4)
    factor = lambda epoch: 0.5 ** epoch  # noqa: E731
    expected, _ = reference_sam(model, batches, rho=0.05, descend=adamw_by_hand(**ADAMW, lr_factor=factor))
    trained = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = funcsam.SAM(trained.parameters(), torch.optim.AdamW, rho=0.05, **ADAMW)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        adapter_steps(trained, optimizer, batches, style, after_step=scheduler.step)
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(ADAMW["lr"] * 0.5 ** 4)
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    assert_trees_close(params_and_buffers(trained)[0], expected, atol=1e-6)


# --- checkpoints ----------------------------------------------------------------------------------

OPTIMIZERS = {
    "sam_adamw": lambda model: funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, model=model, **ADAMW),
    "samsgd": lambda model: funcsam.SAMSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, rho=0.05,
                                           model=model),
}


@cartesian(kind=list(OPTIMIZERS), style=["first_second", "closure"])
def test_state_dict_round_trip_resumes_bit_for_bit(kind, style):
    model, batches = _convnet_and_batches(6)
    make = OPTIMIZERS[kind]
    straight = copy.deepcopy(model)
    optimizer = make(straight)
    adapter_steps(straight, optimizer, batches[:3], style)
    checkpoint = copy.deepcopy({"model": straight.state_dict(), "optimizer": optimizer.state_dict()})
    adapter_steps(straight, optimizer, batches[3:], style)

    resumed = bn_convnet(seed=7).double()
    resumed.load_state_dict(checkpoint["model"])
    optimizer = make(resumed)
    optimizer.load_state_dict(checkpoint["optimizer"])
    adapter_steps(resumed, optimizer, batches[3:], style)

    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# --- fp16 loss scaling with torch.amp.GradScaler ----------------------------------------------------


def _scaled_steps(model, optimizer, batches, style, scaler):
    """SAM steps under fp16 autocast on the CPU; ``scaler`` None means unscaled backward passes."""
    def loss(inputs, targets):
        with torch.autocast("cpu", dtype=torch.float16):
            value = F.cross_entropy(model(inputs), targets)
        return value

    def backward(value):
        (value if scaler is None else scaler.scale(value)).backward()

    for inputs, targets in batches:
        if style == "first_second":
            backward(loss(inputs, targets))
            optimizer.first_step(zero_grad=True, grad_scaler=scaler)
            backward(loss(inputs, targets))
            optimizer.second_step(zero_grad=True, grad_scaler=scaler)
        else:
            def closure():
                optimizer.zero_grad()
                value = loss(inputs, targets)
                backward(value)
                return value
            optimizer.step(closure, grad_scaler=scaler)
        if scaler is not None:
            scaler.update()


def _adamw_state(optimizer):
    return [value.clone() for p in optimizer.state for value in optimizer.state[p].values()]


@pytest.mark.parametrize("style", ["first_second", "closure"])
def test_grad_scaler_matches_unscaled_and_skips_overflow(style):
    model = mlp()
    batches = classification_batches(3, 8, (6,))
    unscaled = copy.deepcopy(model)
    optimizer = funcsam.SAM(unscaled.parameters(), torch.optim.AdamW, rho=0.05, **ADAMW)
    _scaled_steps(unscaled, optimizer, batches, style, scaler=None)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    assert scaler.is_enabled()
    optimizer = funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, **ADAMW)
    _scaled_steps(model, optimizer, batches, style, scaler)
    assert bool(optimizer.last_step_finite) and scaler.get_scale() == 2.0**10
    assert_trees_close(params_and_buffers(model)[0], params_and_buffers(unscaled)[0], atol=1e-6)

    params, state = params_and_buffers(model)[0], _adamw_state(optimizer)
    scaler.update(new_scale=2.0**40)  # the backward of the fp16 matmuls overflows (max 65504)
    _scaled_steps(model, optimizer, batches[:1], style, scaler)
    assert not bool(optimizer.last_step_finite)
    assert scaler.get_scale() == 2.0**39
    assert_trees_equal(params_and_buffers(model)[0], params)
    assert all(torch.equal(a, b) for a, b in zip(_adamw_state(optimizer), state))


# --- non-finite steps and clipping -----------------------------------------------------------------


@pytest.mark.parametrize("style", ["first_second", "closure"])
def test_non_finite_batch_skips_sam_adamw_step(style):
    model, batches = _convnet_and_batches(1)
    optimizer = funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, model=model, **ADAMW)
    adapter_steps(model, optimizer, batches, style)
    params, buffers = params_and_buffers(model)
    state = _adamw_state(optimizer)
    inputs, targets = batches[0]
    inputs = inputs.clone()
    inputs[0, 0, 0, 0] = float("nan")
    adapter_steps(model, optimizer, [(inputs, targets)], style)
    assert not bool(optimizer.last_step_finite)
    assert_trees_equal(params_and_buffers(model)[0], params)
    assert all(torch.equal(a, b) for a, b in zip(_adamw_state(optimizer), state))
    if style == "closure":  # the closure style sees the buffers before the first pass
        assert_trees_equal(params_and_buffers(model)[1], buffers)


def test_max_grad_norm_clips_the_sam_gradient_before_adamw():
    model, batches = _mlp_and_batches(4)
    max_norm = 0.05
    expected, _ = reference_sam(model, batches, rho=0.05, descend=adamw_by_hand(**ADAMW), max_grad_norm=max_norm)
    unclipped, _ = reference_sam(model, batches, rho=0.05, descend=adamw_by_hand(**ADAMW))
    assert max(float((expected[k] - unclipped[k]).abs().max()) for k in expected) > 1e-4  # clipping was active
    rest = {k: v for k, v in ADAMW.items() if k != "lr"}
    params, _, _ = run_sam_step_with_base(model, batches, rho=0.05, lr=ADAMW["lr"], base=funcsam.adamw(**rest),
                                          max_grad_norm=max_norm)
    assert_trees_close(params, expected, atol=1e-6)
    for style in ("first_second", "closure"):
        adapted, _ = _adapter(model, batches, style, torch.optim.AdamW, rho=0.05, max_grad_norm=max_norm, **ADAMW)
        assert_trees_close(adapted, expected, atol=1e-6)
