"""The cheaper SAM modes (schedules, LookSAM, MSAM, GSAM) against their formulas written out by hand.

The references step a copy of the model with plain torch.autograd, one tensor at a time, and apply
the direction with torch.optim.SGD / AdamW: nothing of funcsam's.
"""

import copy

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import funcsam
from funcsam import modes
from helpers import assert_trees_close, classification_batches, mlp, params_and_buffers

EPS = 1e-12
RHO = 0.1
STEPS = 5
# name: (funcsam base, the same update in torch.optim, lr, tolerance over STEPS steps)
BASES = {
    "sgd": (lambda: funcsam.sgd(momentum=0.9, weight_decay=5e-4),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4), 0.1, 1e-6),
    # Adam divides by sqrt(v): float rounding in g shows up larger in the update.
    "adamw": (lambda: funcsam.adamw(weight_decay=0.05),
              lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05), 0.01, 5e-6),
}
both_bases = pytest.mark.parametrize("base_name", list(BASES))


# ---------------------------------------------------------------------------------------------------
# The independent reference
# ---------------------------------------------------------------------------------------------------


def _dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def _norm(a):
    return torch.sqrt(_dot(a, a))


class Reference:
    """A copy of ``model`` stepped by hand: gradients from torch.autograd, updates from torch.optim."""

    def __init__(self, model, base_name):
        self.model = copy.deepcopy(model)
        self.params = list(self.model.parameters())
        self.optimizer = BASES[base_name][1](self.params)
        self.momentum_key = "momentum_buffer" if base_name == "sgd" else "exp_avg"

    def grad_at(self, batch, shift=None):
        """grad L(w + shift), the parameters restored to w exactly afterwards."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, shift or [0.0] * len(self.params)):
                p.add_(s)
        inputs, targets = batch
        grads = torch.autograd.grad(F.cross_entropy(self.model(inputs), targets), self.params)
        with torch.no_grad():
            for p, s in zip(self.params, saved):
                p.copy_(s)
        return list(grads)

    def sam_grads(self, batch, rho):
        g = self.grad_at(batch)
        norm = _norm(g)
        return g, self.grad_at(batch, [rho * gi / (norm + EPS) for gi in g])

    def momentum(self):
        states = [self.optimizer.state[p].get(self.momentum_key) for p in self.params]
        return [torch.zeros_like(p) if m is None else m.clone() for p, m in zip(self.params, states)]

    def apply(self, direction):
        for p, d in zip(self.params, direction):
            p.grad = d.detach().clone()
        self.optimizer.step()

    def named(self, tensors=None):
        names = [name for name, _ in self.model.named_parameters()]
        return dict(zip(names, [t.detach() for t in (tensors or self.params)]))


def reference_looksam(model, batches, pattern, base_name, alpha):
    ref = Reference(model, base_name)
    g_v = [torch.zeros_like(p) for p in ref.params]
    for batch, take_sam in zip(batches, pattern):
        if take_sam:
            g, g_sam = ref.sam_grads(batch, RHO)
            g_v = [gs - _dot(g, g_sam) / (_dot(g, g) + EPS) * gi for gi, gs in zip(g, g_sam)]
            ref.apply(g_sam)
        else:
            g = ref.grad_at(batch)
            ref.apply([gi + alpha * _norm(g) / (_norm(g_v) + EPS) * v for gi, v in zip(g, g_v)])
    return ref.named(), ref.named(g_v)


def reference_msam(model, batches, base_name):
    ref = Reference(model, base_name)
    for batch in batches:
        m = ref.momentum()
        ref.apply(ref.grad_at(batch, [-RHO * mi / (_norm(m) + EPS) for mi in m]))
    return ref.named()


def reference_gsam(model, batches, base_name, alpha):
    ref = Reference(model, base_name)
    for batch in batches:
        g, g_sam = ref.sam_grads(batch, RHO)
        parallel = _dot(g, g_sam) / (_dot(g_sam, g_sam) + EPS)
        ref.apply([gs - alpha * (gi - parallel * gs) for gi, gs in zip(g, g_sam)])
    return ref.named()


# ---------------------------------------------------------------------------------------------------
# Running funcsam
# ---------------------------------------------------------------------------------------------------


def _run(step, model, batches, state_of=lambda base, params: base.init(params), base_name="sgd", **hyper):
    """Params and state after ``step(..., momentum_state, index=i, ...)`` over ``batches``.
    ``hyper`` values that are lists are taken one per step."""
    base = BASES[base_name][0]()
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state = state_of(base, params)
    for index, batch in enumerate(batches):
        kwargs = {k: v[index] if isinstance(v, list) else v for k, v in hyper.items()}
        rho = kwargs.pop("rho", RHO)
        out = step(params, buffers, batch, loss_fn, rho, BASES[base_name][2], state, base=base, **kwargs)
        params, buffers, state = out.params, out.buffers, out.momentum_state
    return params, state


def _assert_trees_equal(a, b):
    leaves_a, spec_a = funcsam.tree.flatten(a)
    leaves_b, spec_b = funcsam.tree.flatten(b)
    assert spec_a == spec_b
    assert all(torch.equal(x, y) for x, y in zip(leaves_a, leaves_b))


def _assert_trees_differ(a: dict, b: dict, by: float):
    """Sanity: the mode under test moves the parameters measurably away from ``b``."""
    assert max((a[k] - b[k]).abs().max().item() for k in a) > by


def _sam_step_with_pattern(pattern):
    def step(*args, index, **kwargs):
        rho = args[4] if pattern[index] else 0
        return funcsam.sam_step(*args[:4], rho, *args[5:], **kwargs)
    return step


# ---------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------


def _scheduled(schedule):
    def step(*args, index, **kwargs):
        return funcsam.scheduled_sam_step(*args, step=index, schedule=schedule, **kwargs)
    return step


def _indexed(step_fn):
    def step(*args, index, **kwargs):
        return step_fn(*args, **kwargs)
    return step


@both_bases
@pytest.mark.parametrize("schedule", [modes.every(1), modes.late(0)], ids=["every(1)", "late(0)"])
def test_every_1_and_late_0_are_full_sam_exactly(base_name, schedule):
    model, batches = mlp(), classification_batches(STEPS, 16, (6,))
    scheduled = _run(_scheduled(schedule), model, batches, base_name=base_name, index=list(range(STEPS)))
    full = _run(_indexed(funcsam.sam_step), model, batches, base_name=base_name, index=list(range(STEPS)))
    _assert_trees_equal(scheduled, full)


@pytest.mark.parametrize("schedule,pattern", [
    (modes.every(3), [True, False, False, True, False, False, True]),
    (modes.late(2), [False, False, True, True, True]),
], ids=["every(3)", "late(2)"])
def test_schedule_interleaves_sam_steps_and_base_steps(schedule, pattern):
    assert [schedule.takes_sam(step) for step in range(len(pattern))] == pattern
    model, batches = mlp(), classification_batches(len(pattern), 16, (6,))
    index = list(range(len(pattern)))
    scheduled = _run(_scheduled(schedule), model, batches, index=index)
    by_hand = _run(_sam_step_with_pattern(pattern), model, batches, index=index)
    _assert_trees_equal(scheduled, by_hand)
    _assert_trees_differ(scheduled[0], _run(_indexed(funcsam.sam_step), model, batches, index=index)[0], by=1e-4)


# ---------------------------------------------------------------------------------------------------
# LookSAM
# ---------------------------------------------------------------------------------------------------

# A cheap step before any SAM step (g_v = 0: the base step), then SAM and cheap steps.
LOOKSAM_PATTERN = [False, True, False, False, True]


def _looksam_state(base, params):
    return funcsam.init_looksam(base, params)


@both_bases
def test_looksam_matches_hand_written_reference(base_name):
    model, batches = mlp(), classification_batches(STEPS, 16, (6,))
    params, state = _run(funcsam.looksam_step, model, batches, _looksam_state, base_name, take_sam=LOOKSAM_PATTERN,
                         alpha=0.7)
    expected_params, expected_g_v = reference_looksam(model, batches, LOOKSAM_PATTERN, base_name, alpha=0.7)
    tolerance = BASES[base_name][3]
    assert_trees_close(params, expected_params, atol=tolerance)
    assert_trees_close(state.g_v, expected_g_v, atol=tolerance)
    assert int(state.base_state.count) == STEPS
    plain = _run(_sam_step_with_pattern(LOOKSAM_PATTERN), model, batches, base_name=base_name, index=list(range(STEPS)))
    _assert_trees_differ(params, plain[0], by=10 * tolerance)  # the cheap steps do reuse g_v


@both_bases
def test_looksam_cheap_step_without_g_v_is_the_base_step_exactly(base_name):
    model, batches = mlp(), classification_batches(1, 16, (6,))
    params, state = _run(funcsam.looksam_step, model, batches, _looksam_state, base_name, take_sam=False)
    base_params, base_state = _run(_indexed(funcsam.sam_step), model, batches, base_name=base_name, rho=0, index=[0])
    _assert_trees_equal((params, state.base_state), (base_params, base_state))


@both_bases
def test_looksam_sam_step_is_sam_step_exactly(base_name):
    model, batches = mlp(), classification_batches(1, 16, (6,))
    params, state = _run(funcsam.looksam_step, model, batches, _looksam_state, base_name, take_sam=True)
    sam_params, sam_state = _run(_indexed(funcsam.sam_step), model, batches, base_name=base_name, index=[0])
    _assert_trees_equal((params, state.base_state), (sam_params, sam_state))


# ---------------------------------------------------------------------------------------------------
# MSAM
# ---------------------------------------------------------------------------------------------------


@both_bases
def test_msam_with_zero_momentum_is_the_base_step_exactly(base_name):
    model, batches = mlp(), classification_batches(1, 16, (6,))
    msam = _run(funcsam.msam_step, model, batches, base_name=base_name)
    base_step = _run(_indexed(funcsam.sam_step), model, batches, base_name=base_name, rho=0, index=[0])
    _assert_trees_equal(msam, base_step)


@both_bases
def test_msam_matches_hand_written_reference(base_name):
    model, batches = mlp(), classification_batches(STEPS, 16, (6,))
    params, _ = _run(funcsam.msam_step, model, batches, base_name=base_name)
    tolerance = BASES[base_name][3]
    assert_trees_close(params, reference_msam(model, batches, base_name), atol=tolerance)
    base_steps = _run(_indexed(funcsam.sam_step), model, batches, base_name=base_name, rho=0, index=list(range(STEPS)))
    _assert_trees_differ(params, base_steps[0], by=10 * tolerance)


def test_msam_loss_is_the_loss_at_the_perturbed_weights():
    model, (batch,) = mlp(), classification_batches(1, 16, (6,))
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    base = funcsam.sgd(momentum=0.9)
    momentum = {k: torch.randn_like(v) for k, v in params.items()}
    state = funcsam.MomentumState(momentum, torch.tensor(3))
    out = funcsam.msam_step(params, buffers, batch, loss_fn, RHO, 0.1, state, base=base)
    norm = _norm(list(momentum.values()))
    perturbed = {k: params[k] - RHO * momentum[k] / (norm + EPS) for k in params}
    torch.testing.assert_close(out.loss, loss_fn(perturbed, buffers, batch)[0])


# ---------------------------------------------------------------------------------------------------
# GSAM
# ---------------------------------------------------------------------------------------------------


@both_bases
def test_gsam_alpha_0_is_sam_step_exactly(base_name):
    model, batches = mlp(), classification_batches(STEPS, 16, (6,))
    gsam = _run(funcsam.gsam_step, model, batches, base_name=base_name, alpha=0.0)
    sam = _run(_indexed(funcsam.sam_step), model, batches, base_name=base_name, index=list(range(STEPS)))
    _assert_trees_equal(gsam, sam)


@both_bases
def test_gsam_matches_hand_written_reference(base_name):
    model, batches = mlp(), classification_batches(STEPS, 16, (6,))
    params, _ = _run(funcsam.gsam_step, model, batches, base_name=base_name, alpha=0.5)
    tolerance = BASES[base_name][3]
    assert_trees_close(params, reference_gsam(model, batches, base_name, alpha=0.5), atol=tolerance)
    sam = _run(_indexed(funcsam.sam_step), model, batches, base_name=base_name, index=list(range(STEPS)))
    _assert_trees_differ(params, sam[0], by=10 * tolerance)


# ---------------------------------------------------------------------------------------------------
# Every mode: loss scaling, grad_reduce, skipped steps
# ---------------------------------------------------------------------------------------------------

# name: (step, state_of, keywords, how many times grad_reduce runs per step)
MODES = {
    "looksam-sam": (funcsam.looksam_step, _looksam_state, dict(take_sam=True), 2),
    "looksam-cheap": (funcsam.looksam_step, _looksam_state, dict(take_sam=False), 1),
    "msam": (funcsam.msam_step, lambda base, params: base.init(params), {}, 1),
    "gsam": (funcsam.gsam_step, lambda base, params: base.init(params), dict(alpha=0.5), 2),
}
every_mode = pytest.mark.parametrize("mode", list(MODES))


def _two_steps(mode, batches, **options):
    """Two steps (the second one with a non-zero momentum and g_v), each given ``options``."""
    step, state_of, keywords, _ = MODES[mode]
    keywords = dict(keywords, take_sam=[True, keywords["take_sam"]]) if "take_sam" in keywords else keywords
    loss_scale = options.pop("loss_scale", None)

    def scaled_step(*args, **kwargs):
        nonlocal loss_scale
        out = step(*args, loss_scale=loss_scale, **kwargs)
        loss_scale = out.loss_scale
        return out
    return _run(scaled_step, mlp(), batches, state_of, "adamw", **keywords, **options)


@every_mode
def test_mode_with_loss_scale_and_grad_reduce_equals_the_plain_step(mode):
    batches = classification_batches(2, 16, (6,))
    calls = []

    def grad_reduce(grads):
        calls.append(len(grads))
        return [g.clone() for g in grads]

    plain = _two_steps(mode, batches)
    # A power-of-two scale multiplies and divides every gradient exactly.
    scaled = _two_steps(mode, batches, loss_scale=funcsam.init_loss_scale(2.0 ** 10), grad_reduce=grad_reduce)
    assert_trees_close(scaled[0], plain[0], atol=1e-7)
    per_step = MODES[mode][3]
    first_step = 2 if mode.startswith("looksam") else per_step
    assert len(calls) == first_step + per_step


@every_mode
def test_non_finite_step_is_skipped_with_all_its_state(mode):
    step, state_of, keywords, _ = MODES[mode]
    model, (batch, bad) = mlp(), classification_batches(2, 16, (6,))
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    base = funcsam.adamw()
    first = step(params, buffers, batch, loss_fn, RHO, 0.01, state_of(base, params), base=base,
                 **dict(keywords, take_sam=True) if "take_sam" in keywords else keywords)
    bad = (torch.full_like(bad[0], float("nan")), bad[1])
    out = step(first.params, buffers, bad, loss_fn, RHO, 0.01, first.momentum_state, base=base, **keywords)
    assert not bool(out.finite)
    _assert_trees_equal((out.params, out.momentum_state), (first.params, first.momentum_state))


# ---------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match=r"k must be an int >= 1"):
        modes.every(0)
    with pytest.raises(TypeError, match=r"k must be an int"):
        modes.every(2.0)
    with pytest.raises(TypeError, match=r"k must be an int"):
        modes.every(True)
    with pytest.raises(ValueError, match=r"start_step must be an int >= 0"):
        modes.late(-1)
    with pytest.raises(TypeError, match=r"start_step must be an int"):
        modes.late(1.5)
    with pytest.raises(TypeError, match=r"step must be an int"):
        modes.every(2).takes_sam(1.0)
    with pytest.raises(ValueError, match=r"step must be an int >= 0"):
        modes.late(0).takes_sam(-1)

    model, (batch,) = mlp(), classification_batches(1, 4, (6,))
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    base = funcsam.sgd(momentum=0.9)
    args = (params, buffers, batch, loss_fn, RHO, 0.1)
    state, looksam_state = base.init(params), funcsam.init_looksam(base, params)

    with pytest.raises(TypeError, match=r"step must be an int"):
        funcsam.scheduled_sam_step(*args, state, step=torch.tensor(1), schedule=modes.every(2), base=base)
    with pytest.raises(TypeError, match=r"schedule must be funcsam.every\(k\) or funcsam.late"):
        funcsam.scheduled_sam_step(*args, state, step=1, schedule=2, base=base)
    for alpha, error in [(-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                         (torch.tensor(0.5), TypeError)]:
        with pytest.raises(error, match=r"alpha"):
            funcsam.gsam_step(*args, state, alpha=alpha, base=base)
        with pytest.raises(error, match=r"alpha"):
            funcsam.looksam_step(*args, looksam_state, take_sam=False, alpha=alpha, base=base)
    with pytest.raises(TypeError, match=r"take_sam must be a Python bool"):
        funcsam.looksam_step(*args, looksam_state, take_sam=torch.tensor(True), base=base)
    with pytest.raises(TypeError, match=r"funcsam.LookSAMState"):
        funcsam.looksam_step(*args, state, take_sam=True, base=base)
    wrong_g_v = modes.LookSAMState(state, {k: v[..., :1] for k, v in params.items()})
    with pytest.raises(ValueError, match=r"momentum_state.g_v does not have the structure"):
        funcsam.looksam_step(*args, wrong_g_v, take_sam=True, base=base)
    with pytest.raises(ValueError, match=r"SGD base with momentum=0"):
        funcsam.msam_step(*args, funcsam.sgd().init(params), base=funcsam.sgd())
    with pytest.raises(ValueError, match=r"SGD base with momentum=0"):
        funcsam.msam_step(*args, funcsam.sgd().init(params))


# ---------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------


def _compiled_run(step, state_of, n_steps, **per_step):
    """``_run`` of ``torch.compile(step, fullgraph=True)`` (a graph counter as backend) with lr and
    rho 0-dim tensors that change every step; returns (params, frames compiled)."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    model, batches = mlp(), classification_batches(n_steps, 8, (6,))
    rhos = [torch.tensor(0.05 + 0.01 * i) for i in range(n_steps)]
    lrs = [torch.tensor(0.1 * 0.9 ** i) for i in range(n_steps)]

    def with_tensor_lr(fn):
        def step_with_lr(params, buffers, batch, loss_fn, rho, lr, state, *, index, **kwargs):
            return fn(params, buffers, batch, loss_fn, rho, lrs[index], state, **kwargs)
        return step_with_lr

    index = list(range(n_steps))
    params, _ = _run(with_tensor_lr(compiled), model, batches, state_of, rho=rhos, index=index, **per_step)
    eager, _ = _run(with_tensor_lr(step), model, batches, state_of, rho=rhos, index=index, **per_step)
    assert_trees_close(params, eager, atol=1e-6)
    return counter.frame_count


@pytest.mark.slow
def test_compiled_modes_take_one_graph_per_branch_with_changing_lr_and_rho():
    schedule = modes.every(2)
    takes = [schedule.takes_sam(i) for i in range(5)]
    assert _compiled_run(funcsam.looksam_step, _looksam_state, 5, take_sam=takes) == 2  # SAM step, cheap step
    assert _compiled_run(funcsam.msam_step, lambda base, params: base.init(params), 3) == 1

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled_sam_step = torch.compile(funcsam.sam_step, backend=counter, fullgraph=True)
    model, batches = mlp(), classification_batches(5, 8, (6,))
    rhos = [torch.tensor(0.05 + 0.01 * i) for i in range(5)]
    params, _ = _run(_scheduled(schedule), model, batches, sam_step_fn=compiled_sam_step, rho=rhos,
                     index=list(range(5)))
    assert counter.frame_count == 2  # SAM step, base step
    eager, _ = _run(_scheduled(schedule), model, batches, rho=rhos, index=list(range(5)))
    assert_trees_close(params, eager, atol=1e-6)
