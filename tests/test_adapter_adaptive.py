"""funcsam.SAM and funcsam.SAMSGD with ``mode=funcsam.AESAM(...)`` equal ``funcsam.adaptive_sam_step``.

The reference is the functional AE-SAM step over the same batches, with the thresholds AESAM uses
(``linear_threshold(t, total_steps)``), following its own ``take_next``. The adapters are SAMSGD and SAM
over torch.optim.SGD with momentum, on the MLP and batches of tests/test_policy.py, whose scales make
the decisions alternate.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import funcsam

from funcsam import AESAM
from helpers import adapter_steps as closure_steps
from helpers import assert_trees_close, assert_trees_equal, classification_batches, mlp, params_and_buffers

RHO, LR, MOMENTUM, WEIGHT_DECAY, DELTA = 0.1, 0.1, 0.9, 5e-4, 0.9
# As in test_policy.py: ||g||^2 jumps up and down, and the lagged rule gives these decisions.
SCALES = [1.0, 1.0, 0.2, 3.0, 0.2, 3.0, 0.2, 3.0]
DECISIONS = [True, True, True, False, True, False, True, True]
STEPS = len(SCALES)

ADAPTERS = {
    "samsgd": lambda params, mode: funcsam.SAMSGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                                  rho=RHO, mode=mode),
    "sam_sgd": lambda params, mode: funcsam.SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
                                                weight_decay=WEIGHT_DECAY, mode=mode),
}


def _batches(scales=SCALES):
    batches = classification_batches(len(scales), 16, (6,))
    return [(inputs * scale, targets) for (inputs, targets), scale in zip(batches, scales)]


def functional(model, batches, total_steps=STEPS, delta=DELTA):
    """``(params, AdaptiveState, decisions)`` after funcsam.adaptive_sam_step over ``batches``."""
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    base = funcsam.sgd(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    state = funcsam.init_adaptive(base, params)
    decisions = []
    for t, batch in enumerate(batches):
        take = bool(state.take_next)
        decisions.append(take)
        out = funcsam.adaptive_sam_step(params, buffers, batch, loss_fn, RHO, LR, state, take_sam=take,
                                       threshold=funcsam.linear_threshold(t, total_steps), delta=delta, base=base)
        params, buffers, state = out.params, out.buffers, out.momentum_state
    return params, state, decisions


def _statistics(optimizer) -> dict:
    return optimizer.state_dict()["funcsam"]["adaptive"]


def adapter_steps(model, optimizer, batches, *, scaler=None):
    """Steps ``optimizer`` over ``batches`` with a sam.pytorch closure; returns (decisions, closure calls per step)."""
    decisions = [bool(_statistics(optimizer)["take_next"])]
    calls = closure_steps(model, optimizer, batches, "closure", scaler=scaler,
                          after_step=lambda: decisions.append(bool(_statistics(optimizer)["take_next"])))
    return decisions[:-1], calls


def adapted(adapter, model, batches, mode=None):
    model = copy.deepcopy(model)
    optimizer = ADAPTERS[adapter](model.parameters(), mode or AESAM(total_steps=STEPS, delta=DELTA))
    decisions, calls = adapter_steps(model, optimizer, batches)
    return params_and_buffers(model)[0], optimizer, decisions, calls


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------------------------------------------
# The same steps as adaptive_sam_step
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_adapter_equals_adaptive_sam_step_and_alternates(adapter):
    model, batches = mlp(), _batches()
    expected, state, expected_decisions = functional(model, batches)
    params, optimizer, decisions, calls = adapted(adapter, model, batches)

    assert expected_decisions == DECISIONS  # the batches do make the policy alternate
    assert decisions == DECISIONS
    assert calls == [2 if take else 1 for take in DECISIONS]  # a base step is one pass
    assert_trees_close(params, expected, atol=1e-6)
    statistics = _statistics(optimizer)
    torch.testing.assert_close(statistics["mean"], state.mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(statistics["var"], state.var, rtol=1e-5, atol=1e-12)
    assert int(statistics["count"]) == int(state.count) == STEPS
    assert bool(statistics["take_next"]) == bool(state.take_next)
    assert statistics["mean"].dtype == statistics["var"].dtype == torch.float32
    assert statistics["count"].dtype == torch.int64 and statistics["take_next"].dtype == torch.bool
    assert optimizer.steps_taken == STEPS and optimizer.mode == AESAM(STEPS)


def test_sam_with_the_gradient_already_there_takes_the_same_steps():
    """davda54's style: backward at w before step(closure); a base step then calls no closure at all."""
    model, batches = mlp(), _batches()
    expected, _, _ = functional(model, batches)
    trained = copy.deepcopy(model)
    optimizer = ADAPTERS["sam_sgd"](trained.parameters(), AESAM(STEPS))
    calls = []
    for inputs, targets in batches:
        F.cross_entropy(trained(inputs), targets).backward()
        count = []

        def closure(inputs=inputs, targets=targets, count=count):
            count.append(1)
            loss = F.cross_entropy(trained(inputs), targets)
            loss.backward()
            return loss

        optimizer.step(closure)
        optimizer.zero_grad()
        calls.append(len(count))
    assert calls == [1 if take else 0 for take in DECISIONS]
    assert_trees_close(params_and_buffers(trained)[0], expected, atol=1e-6)


def test_delta_start_and_end_reach_the_rule():
    model, batches = mlp(), _batches()
    mode = AESAM(total_steps=20, delta=0.5, start=0.5, end=-2.0)
    params, optimizer, decisions, _ = adapted("samsgd", model, batches, mode=mode)
    # The reference with the same delta and c_t = 0.5 - 2.5 t / 20.
    ref_params, ref_buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    base = funcsam.sgd(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    state, expected_decisions = funcsam.init_adaptive(base, ref_params), []
    for t, batch in enumerate(batches):
        expected_decisions.append(bool(state.take_next))
        out = funcsam.adaptive_sam_step(ref_params, ref_buffers, batch, loss_fn, RHO, LR, state,
                                       take_sam=bool(state.take_next), threshold=0.5 - 2.5 * t / 20, delta=0.5,
                                       base=base)
        ref_params, ref_buffers, state = out.params, out.buffers, out.momentum_state
    assert decisions == expected_decisions
    assert_trees_close(params, ref_params, atol=1e-6)
    torch.testing.assert_close(_statistics(optimizer)["mean"], state.mean, rtol=1e-6, atol=0)


def test_grad_scaler_gives_the_statistics_of_the_unscaled_gradient():
    model, batches = mlp(), _batches()
    straight, plain, decisions, _ = adapted("samsgd", model, batches)
    scaled = copy.deepcopy(model)
    optimizer = ADAPTERS["samsgd"](scaled.parameters(), AESAM(STEPS))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)  # exact powers of two
    scaled_decisions, _ = adapter_steps(scaled, optimizer, batches, scaler=scaler)
    assert scaled_decisions == decisions
    assert_trees_equal(params_and_buffers(scaled)[0], straight)
    for name, value in _statistics(plain).items():
        assert torch.equal(_statistics(optimizer)[name], value), name


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_non_finite_step_is_skipped_with_the_statistics(adapter):
    model, batches = mlp(), _batches()
    optimizer = ADAPTERS[adapter](model.parameters(), AESAM(STEPS))
    inputs, targets = batches[0]
    bad = [(torch.full_like(inputs, float("nan")), targets)]
    adapter_steps(model, optimizer, batches[:3])  # take_next is False now: the next step is a base step
    for take in (False, True):
        assert bool(_statistics(optimizer)["take_next"]) == take
        params, statistics, steps = params_and_buffers(model)[0], _statistics(optimizer), optimizer.steps_taken
        decisions, calls = adapter_steps(model, optimizer, bad)
        assert decisions == [take] and calls == [2 if take else 1]
        assert not bool(optimizer.last_step_finite)
        assert_trees_equal(params_and_buffers(model)[0], params)
        kept = {name: value for name, value in statistics.items() if name != "step"}
        assert all(torch.equal(_statistics(optimizer)[name], value) for name, value in kept.items())
        # The threshold's step index moves on.
        assert optimizer.steps_taken == int(_statistics(optimizer)["step"]) == steps + 1
        adapter_steps(model, optimizer, batches[3:4])  # a finite step with n big enough to say SAM next


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_state_dict_round_trip_mid_run_resumes_bit_for_bit(adapter):
    model, batches = mlp(), _batches()
    straight, straight_optimizer, _, _ = adapted(adapter, model, batches)

    first = copy.deepcopy(model)
    optimizer = ADAPTERS[adapter](first.parameters(), AESAM(STEPS))
    adapter_steps(first, optimizer, batches[:3])
    checkpoint = _round_trip({"model": first.state_dict(), "optimizer": optimizer.state_dict()})
    saved = checkpoint["optimizer"]["funcsam"]
    assert saved["steps_taken"] == 3 and int(saved["adaptive"]["count"]) == 3
    assert not bool(saved["adaptive"]["take_next"])  # step 3 is a base step

    def resume(optimizer_state):
        resumed = mlp(seed=7)
        resumed.load_state_dict(checkpoint["model"])
        optimizer = ADAPTERS[adapter](resumed.parameters(), AESAM(STEPS))
        optimizer.load_state_dict(optimizer_state)
        decisions, _ = adapter_steps(resumed, optimizer, batches[3:])
        return params_and_buffers(resumed)[0], optimizer, decisions

    params, resumed_optimizer, decisions = resume(checkpoint["optimizer"])
    assert decisions == DECISIONS[3:]
    assert_trees_equal(params, straight)
    assert resumed_optimizer.steps_taken == STEPS
    for name, value in _statistics(straight_optimizer).items():
        assert torch.equal(_statistics(resumed_optimizer)[name], value), name
    # Without funcsam's entry the statistics start afresh: step 3 takes SAM, and the run differs.
    forgetful = {key: value for key, value in checkpoint["optimizer"].items() if key != "funcsam"}
    params, _, decisions = resume(forgetful)
    assert decisions[0] and max(float((params[k] - straight[k]).abs().max()) for k in params) > 1e-6


def test_bad_adaptive_entry_in_state_dict_is_refused_and_changes_nothing():
    model, batches = mlp(), _batches()
    optimizer = ADAPTERS["samsgd"](model.parameters(), AESAM(STEPS))
    adapter_steps(model, optimizer, batches[:3])
    good = optimizer.state_dict()
    before = {name: value.clone() for name, value in _statistics(optimizer).items()}
    statistics = good["funcsam"]["adaptive"]
    bad_entries = [
        "statistics",
        {key: value for key, value in statistics.items() if key != "var"},  # one missing
        {**statistics, "extra": torch.tensor(1.0)},
        {**statistics, "mean": statistics["mean"].double()},  # another dtype
        {**statistics, "count": statistics["count"].float()},
        {**statistics, "take_next": torch.tensor([True])},  # not 0-dim
        {**statistics, "mean": 1.0},  # not a tensor
        {**statistics, "var": torch.tensor(-1.0)},
        {**statistics, "mean": torch.tensor(float("nan"))},
        {**statistics, "count": torch.tensor(-1)},
    ]
    for bad in bad_entries:
        with pytest.raises(ValueError, match=r"state_dict\['funcsam'\]\['adaptive'\]"):
            optimizer.load_state_dict({**good, "funcsam": {**good["funcsam"], "adaptive": bad}})
    assert optimizer.steps_taken == 3
    assert all(torch.equal(_statistics(optimizer)[name], value) for name, value in before.items())


def test_another_modes_optimizer_ignores_the_statistics():
    model, batches = mlp(), _batches(SCALES[:2])
    optimizer = ADAPTERS["samsgd"](model.parameters(), AESAM(STEPS))
    adapter_steps(model, optimizer, batches)
    every = ADAPTERS["samsgd"](model.parameters(), funcsam.every(2))
    every.load_state_dict(optimizer.state_dict())
    assert every.steps_taken == 2 and "adaptive" not in every.state_dict()["funcsam"]


# ---------------------------------------------------------------------------------------------------
# The shared rule
# ---------------------------------------------------------------------------------------------------


def test_adaptive_statistics_is_the_rule():
    zero, no = torch.zeros(()), torch.zeros((), dtype=torch.int64)
    mean, var, count, take = funcsam.modes.adaptive_statistics(zero, zero, no, torch.tensor(True), torch.tensor(4.0),
                                                        threshold=1.0, delta=0.5)
    assert (float(mean), float(var), int(count), bool(take)) == (4.0, 0.0, 1, True)  # the first n initialises
    mean, var, count, take = funcsam.modes.adaptive_statistics(mean, var, count, take, torch.tensor(2.0), threshold=0.0,
                                                        delta=0.5)
    assert (float(mean), float(var), int(count), bool(take)) == (3.0, 0.5, 2, False)  # 2 < 3 + 0 * sqrt(0.5)
    kept = funcsam.modes.adaptive_statistics(mean, var, count, take, torch.tensor(100.0), threshold=0.0, delta=0.5,
                                      finite=torch.tensor(False))
    assert [float(x) for x in kept] == [3.0, 0.5, 2, False]
    # The rule is pure tensor code: the mode checks delta and the threshold once, when it is built.
    with pytest.raises(ValueError, match=r"delta must be"):
        AESAM(threshold=0.0, delta=1.0)
    with pytest.raises(ValueError, match=r"threshold"):
        AESAM(threshold=float("nan"), delta=0.5)


def test_threshold_moves_linearly_and_stays_at_end_past_total_steps():
    mode = AESAM(total_steps=4, start=1.0, end=-1.0)
    thresholds = [float(mode.threshold_at(torch.tensor(t))) for t in range(7)]
    assert thresholds == [1.0, 0.5, 0.0, -0.5, -1.0, -1.0, -1.0]
    assert thresholds[:5] == [funcsam.linear_threshold(t, 4) for t in range(5)]


# ---------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_first_and_second_step_refuse_aesam(adapter):
    model, (batch,) = mlp(), _batches(SCALES[:1])
    optimizer = ADAPTERS[adapter](model.parameters(), AESAM(STEPS))
    before = params_and_buffers(model)[0]
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    with pytest.raises(RuntimeError, match=r"first_step\(\) .*AESAM.* call loss = optimizer.step\(closure\)"):
        optimizer.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match=r"second_step\(\) .* optimizer.step\(closure\)"):
        optimizer.second_step(zero_grad=True)
    assert_trees_equal(params_and_buffers(model)[0], before)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(total_steps=0), ValueError, r"total_steps must be an int >= 1"),
    (dict(total_steps=10.0), TypeError, r"total_steps must be an int .* got float"),
    (dict(total_steps=True), TypeError, r"total_steps must be an int .* got bool"),
    (dict(total_steps=10, delta=1.0), ValueError, r"delta must be in \[0, 1\)"),
    (dict(total_steps=10, delta=-0.1), ValueError, r"delta must be in \[0, 1\)"),
    (dict(total_steps=10, delta=float("nan")), ValueError, r"delta must be a finite number"),
    (dict(total_steps=10, delta=torch.tensor(0.9)), TypeError, r"delta must be a Python number"),
    (dict(total_steps=10, start=float("inf")), ValueError, r"start must be a finite real number"),
    (dict(total_steps=10, end=float("nan")), ValueError, r"end must be a finite real number"),
    (dict(total_steps=10, end="-1"), ValueError, r"end must be a finite real number"),
])
def test_bad_aesam_fields_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        AESAM(**kwargs)


def test_aesam_is_exported_frozen_and_refused_as_a_class():
    assert funcsam.AESAM is AESAM and "AESAM" in funcsam.__all__ and "adaptive_statistics" in funcsam.modes.__all__
    mode = AESAM(10)
    with pytest.raises(AttributeError):
        mode.delta = 0.5
    assert mode == AESAM(total_steps=10, delta=0.9, start=1.0, end=-1.0)
    with pytest.raises(TypeError, match=r"mode=funcsam.AESAM\(total_steps=10000\), not AESAM itself"):
        funcsam.SAMSGD(mlp().parameters(), lr=0.1, mode=AESAM)
