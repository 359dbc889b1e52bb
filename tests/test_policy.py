"""AE-SAM (funcsam.policy) against its rule written out by hand.

The reference steps a copy of the model with plain torch.autograd, one tensor at a time: it computes
both the SAM and the base gradient on every step, picks one by the lagged rule, applies SGD with
momentum by hand, and keeps the statistics in Python floats (float64). Nothing of funcsam's.
"""

import copy
import math

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import funcsam

from helpers import assert_trees_close, assert_trees_equal, classification_batches, mlp, params_and_buffers

RHO, LR, MOMENTUM, WEIGHT_DECAY, EPS, DELTA = 0.1, 0.1, 0.9, 5e-4, 1e-12, 0.9
# Inputs scaled per batch so that ||g||^2 jumps up and down: the policy alternates between SAM and
# the base step (decisions True, True, True, False, True, False, True, True; each rule at least 0.08
# away from its bar except step 0's, a tie by construction).
SCALES = [1.0, 1.0, 0.2, 3.0, 0.2, 3.0, 0.2, 3.0]


def _batches(scales=SCALES):
    batches = classification_batches(len(scales), 16, (6,))
    return [(inputs * scale, targets) for (inputs, targets), scale in zip(batches, scales)]


def _thresholds(n):
    return [funcsam.linear_threshold(t, n) for t in range(n)]


def reference_ae_sam(model, batches, thresholds, *, delta=DELTA):
    """AE-SAM + torch.optim.SGD(momentum, weight_decay) by hand, with the one-step lag of funcsam's design.

    Returns (params, decisions, [(mean, var) after each step], take_next after the last step).
    """
    model = copy.deepcopy(model)
    params = list(model.parameters())
    momentum_buffers = [None] * len(params)

    def gradient(inputs, targets):
        return torch.autograd.grad(F.cross_entropy(model(inputs), targets), params)

    take, mean, var = True, None, None
    decisions, statistics = [], []
    for (inputs, targets), threshold in zip(batches, thresholds):
        decisions.append(take)
        g = gradient(inputs, targets)
        with torch.no_grad():
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
            e = [RHO * gi / (norm + EPS) for gi in g]
            for p, ei in zip(params, e):
                p.add_(ei)
        g_sam = gradient(inputs, targets)
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.sub_(ei)
            for i, (p, gi) in enumerate(zip(params, g_sam if take else g)):
                d = gi + WEIGHT_DECAY * p
                momentum_buffers[i] = d.clone() if momentum_buffers[i] is None else MOMENTUM * momentum_buffers[i] + d
                p.sub_(LR * momentum_buffers[i])
        n = sum(float((gi.double() ** 2).sum()) for gi in g)
        if mean is None:
            mean, var = n, 0.0
        else:
            mean = delta * mean + (1 - delta) * n
            var = delta * var + (1 - delta) * (n - mean) ** 2
        statistics.append((mean, var))
        take = n >= mean + threshold * math.sqrt(var)
    return params_and_buffers(model)[0], decisions, statistics, take


def _counting(loss_fn, calls):
    def counted(*args):
        calls.append(1)
        return loss_fn(*args)
    return counted


def _run_policy(model, batches, thresholds, step_fn=funcsam.adaptive_sam_step, rhos=None, lrs=None, count=True,
                **options):
    """funcsam's AE-SAM over ``batches``, following the policy. Returns (params, state, decisions,
    loss_fn calls per step, [(mean, var) after each step]). ``count=False`` leaves loss_fn uncounted
    (the counter's list would be a guard under torch.compile)."""
    params, buffers = params_and_buffers(model)
    calls = []
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    loss_fn = _counting(loss_fn, calls) if count else loss_fn
    base = funcsam.sgd(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    state = funcsam.init_adaptive(base, params)
    decisions, calls_per_step, statistics = [], [], []
    for index, (batch, threshold) in enumerate(zip(batches, thresholds)):
        take = bool(state.take_next)
        decisions.append(take)
        before = len(calls)
        out = step_fn(params, buffers, batch, loss_fn, RHO if rhos is None else rhos[index],
                      LR if lrs is None else lrs[index], state, take_sam=take, threshold=threshold, base=base,
                      **options)
        calls_per_step.append(len(calls) - before)
        params, buffers, state = out.params, out.buffers, out.momentum_state
        statistics.append((float(state.mean), float(state.var)))
    return params, state, decisions, calls_per_step, statistics


# ---------------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tensor_threshold", [False, True], ids=["float-c", "tensor-c"])
def test_matches_hand_written_reference_and_takes_sam_exactly_when_the_rule_says(tensor_threshold):
    model, batches = mlp(), _batches()
    thresholds = _thresholds(len(batches))
    expected_params, expected_decisions, expected_statistics, expected_next = reference_ae_sam(model, batches,
                                                                                               thresholds)
    given = [torch.tensor(c) for c in thresholds] if tensor_threshold else thresholds
    params, state, decisions, calls, statistics = _run_policy(model, batches, given)

    assert decisions == expected_decisions
    assert decisions.count(False) >= 2 and decisions.count(True) >= 2  # it does alternate
    assert calls == [2 if take else 1 for take in decisions]  # a base step is one pass
    assert bool(state.take_next) == expected_next
    torch.testing.assert_close(torch.tensor(statistics, dtype=torch.float64),
                               torch.tensor(expected_statistics, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    assert_trees_close(params, expected_params, atol=1e-6)
    assert int(state.count) == int(state.base_state.count) == len(batches)


def test_sam_step_and_base_step_are_sam_step_exactly():
    model, (batch,) = mlp(), classification_batches(1, 16, (6,))
    params, buffers = params_and_buffers(model)
    base = funcsam.sgd(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for take_sam, rho in [(True, RHO), (False, 0)]:
        calls = []
        loss_fn = _counting(funcsam.make_loss_fn(model, F.cross_entropy), calls)
        out = funcsam.adaptive_sam_step(params, buffers, batch, loss_fn, RHO, LR, funcsam.init_adaptive(base, params),
                                       take_sam=take_sam, threshold=0.0, base=base)
        assert len(calls) == (2 if take_sam else 1)
        plain = funcsam.sam_step(params, buffers, batch, loss_fn, rho, LR, base.init(params), base=base)
        assert_trees_equal(out.params, plain.params)
        assert_trees_equal(out.momentum_state.base_state.momentum_buffer, plain.momentum_state.momentum_buffer)
        torch.testing.assert_close(out.grad_norm, plain.grad_norm, rtol=0, atol=0)


def test_first_gradient_initialises_the_statistics_and_the_first_two_steps_take_sam():
    model, batches = mlp(), classification_batches(1, 16, (6,))
    params, buffers = params_and_buffers(model)
    state = funcsam.init_adaptive(None, params)
    assert bool(state.take_next) and int(state.count) == 0
    assert state.mean.dtype == state.var.dtype == torch.float32 and state.take_next.dtype == torch.bool
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    out = funcsam.adaptive_sam_step(params, buffers, batches[0], loss_fn, RHO, LR, state, take_sam=True,
                                   threshold=1.0)
    g = torch.autograd.grad(F.cross_entropy(model(batches[0][0]), batches[0][1]), list(model.parameters()))
    torch.testing.assert_close(out.momentum_state.mean, sum((gi ** 2).sum() for gi in g), rtol=1e-6, atol=0)
    assert float(out.momentum_state.var) == 0.0
    assert bool(out.momentum_state.take_next) and int(out.momentum_state.count) == 1


def test_asam_watches_the_plain_gradient_norm():
    model, (batch,) = mlp(), classification_batches(1, 16, (6,))
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    out = funcsam.adaptive_sam_step(params, buffers, batch, loss_fn, 1.0, LR, funcsam.init_adaptive(None, params),
                                   take_sam=True, threshold=0.0, adaptive=True)
    plain = funcsam.sam_step(params, buffers, batch, loss_fn, 0, LR, funcsam.init_momentum(params))
    torch.testing.assert_close(out.momentum_state.mean, plain.grad_norm ** 2, rtol=1e-6, atol=0)
    assert abs(float(out.grad_norm) - float(plain.grad_norm)) > 1e-3  # the engine's is ||T g||


def test_loss_scale_and_grad_reduce_give_the_same_statistics():
    model, batches = mlp(), _batches(SCALES[:4])
    thresholds = _thresholds(4)
    plain = _run_policy(model, batches, thresholds)
    reduced = []

    def grad_reduce(grads):
        reduced.append(len(grads))
        return [g.clone() for g in grads]

    scale = funcsam.init_loss_scale(2.0 ** 10)  # a power of two: scaling and unscaling are exact

    def scaled_step(*args, **kwargs):
        nonlocal scale
        out = funcsam.adaptive_sam_step(*args, loss_scale=scale, grad_reduce=grad_reduce, **kwargs)
        scale = out.loss_scale
        return out

    scaled = _run_policy(model, batches, thresholds, step_fn=scaled_step)
    assert scaled[2] == plain[2]
    assert scaled[4] == plain[4]
    assert_trees_close(scaled[0], plain[0], atol=1e-7)
    assert len(reduced) == sum(2 if take else 1 for take in plain[2])


def test_non_finite_step_is_skipped_with_the_statistics_and_the_decision():
    model, (batch, bad) = mlp(), classification_batches(2, 16, (6,))
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    base = funcsam.sgd(momentum=MOMENTUM)
    first = funcsam.adaptive_sam_step(params, buffers, batch, loss_fn, RHO, LR, funcsam.init_adaptive(base, params),
                                     take_sam=True, threshold=0.5, base=base)
    bad = (torch.full_like(bad[0], float("nan")), bad[1])
    for take_sam in (True, False):
        out = funcsam.adaptive_sam_step(first.params, buffers, bad, loss_fn, RHO, LR, first.momentum_state,
                                       take_sam=take_sam, threshold=-3.0, base=base)
        assert not bool(out.finite)
        assert_trees_equal(out.params, first.params)
        # Everything is kept but the step index, which moves on (the threshold schedule counts skipped steps).
        got = funcsam.tree.flatten(out.momentum_state._replace(step=None))[0]
        kept = funcsam.tree.flatten(first.momentum_state._replace(step=None))[0]
        assert len(got) == len(kept) and all(torch.equal(a, b) for a, b in zip(got, kept))
        assert int(out.momentum_state.step) == int(first.momentum_state.step) + 1


# ---------------------------------------------------------------------------------------------------
# The threshold schedule
# ---------------------------------------------------------------------------------------------------


def test_linear_threshold_moves_from_start_to_end():
    assert funcsam.linear_threshold(0, 100) == 1.0
    assert funcsam.linear_threshold(50, 100) == 0.0
    assert funcsam.linear_threshold(100, 100) == -1.0
    assert funcsam.linear_threshold(1, 4, start=-1.0, end=1.0) == -0.5


# ---------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------


def test_bad_arguments_are_refused_by_name():
    model, (batch,) = mlp(), classification_batches(1, 4, (6,))
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state = funcsam.init_adaptive(None, params)
    args = (params, buffers, batch, loss_fn, RHO, LR)

    def step(**overrides):
        return funcsam.adaptive_sam_step(*args, state, **{"take_sam": True, "threshold": 0.0, **overrides})

    for delta, error in [(1.0, ValueError), (-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                         (True, TypeError), (torch.tensor(0.9), TypeError)]:
        with pytest.raises(error, match=r"delta must be"):
            step(delta=delta)
    for take_sam in (torch.tensor(True), 1, None, state.take_next):
        with pytest.raises(TypeError, match=r"take_sam must be a Python bool"):
            step(take_sam=take_sam)
    for threshold, error in [(float("inf"), ValueError), (float("nan"), ValueError),
                             (torch.tensor(float("nan")), ValueError), (torch.tensor([0.0, 1.0]), ValueError),
                             (torch.tensor(1), ValueError), ("1", TypeError), (None, TypeError)]:
        with pytest.raises(error, match=r"threshold"):
            step(threshold=threshold)
    with pytest.raises(TypeError, match=r"funcsam.AdaptiveState"):
        funcsam.adaptive_sam_step(*args, funcsam.init_momentum(params), take_sam=True, threshold=0.0)
    with pytest.raises(TypeError, match=r"funcsam.AdaptiveState"):
        funcsam.adaptive_sam_step(*args, tuple(state), take_sam=True, threshold=0.0)

    with pytest.raises(ValueError, match=r"step must be <= total_steps"):
        funcsam.linear_threshold(11, 10)
    with pytest.raises(ValueError, match=r"total_steps must be an int >= 1"):
        funcsam.linear_threshold(0, 0)
    with pytest.raises(TypeError, match=r"step must be an int"):
        funcsam.linear_threshold(1.0, 10)
    with pytest.raises(ValueError, match=r"start must be a finite"):
        funcsam.linear_threshold(1, 10, start=float("inf"))


# ---------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_policy_takes_two_graphs_with_changing_lr_rho_and_threshold():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(funcsam.adaptive_sam_step, backend=counter, fullgraph=True)
    model, batches = mlp(), _batches(SCALES[:5])
    thresholds = [torch.tensor(c) for c in _thresholds(5)]
    rhos = [torch.tensor(RHO + 0.01 * i) for i in range(5)]
    lrs = [torch.tensor(LR * 0.9 ** i) for i in range(5)]
    params, state, decisions, _, statistics = _run_policy(model, batches, thresholds, step_fn=compiled, rhos=rhos,
                                                          lrs=lrs, count=False)
    assert set(decisions) == {True, False}
    assert counter.frame_count == 2  # the SAM step and the base step
    eager = _run_policy(model, batches, thresholds, rhos=rhos, lrs=lrs)
    assert decisions == eager[2]
    assert_trees_close(params, eager[0], atol=1e-6)
    torch.testing.assert_close(torch.tensor(statistics), torch.tensor(eager[4]), rtol=1e-6, atol=0)
