"""funcsam.SAM and funcsam.SAMSGD with ``mode=``: each cheaper mode equals its pure form.

The reference is ``funcsam.sam_step`` with the same mode object over the same batches, each step
taking SAM where ``mode.takes_sam(step, state)`` says; the adapters run SAMSGD, SAM over
torch.optim.SGD with momentum, and SAM over AdamW, in float64.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import funcsam
from funcsam import modes
from funcsam import GSAM, MSAM, LookSAM
from helpers import (
    adapter_steps, assert_trees_close, assert_trees_equal, bn_convnet, cartesian, classification_batches, mlp,
    params_and_buffers, run_sam_step_with_base,
)

RHO = 0.1
STEPS = 6
SGD_HYPER = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
ADAMW_HYPER = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)

# name: (the adapter over params with extra keywords, the same base optimizer as a pure part, lr)
ADAPTERS = {
    "samsgd": (lambda params, **kw: funcsam.SAMSGD(params, rho=RHO, **SGD_HYPER, **kw),
               lambda: funcsam.sgd(momentum=0.9, weight_decay=5e-4), 0.1),
    "sam_sgd": (lambda params, **kw: funcsam.SAM(params, torch.optim.SGD, rho=RHO, **SGD_HYPER, **kw),
                lambda: funcsam.sgd(momentum=0.9, weight_decay=5e-4), 0.1),
    "sam_adamw": (lambda params, **kw: funcsam.SAM(params, torch.optim.AdamW, rho=RHO, **ADAMW_HYPER, **kw),
                  lambda: funcsam.adamw(betas=(0.9, 0.99), weight_decay=0.05), 1e-2),
}

MODES = {
    "every(3)": modes.every(3),
    "late(2)": modes.late(2),
    "looksam(3)": LookSAM(k=3, alpha=0.7),
    "msam": MSAM(),
    "gsam": GSAM(alpha=0.5),
}
ONE_PASS_MODES = {"every(2)": modes.every(2), "late(0)": modes.late(0), "looksam(2)": LookSAM(k=2), "msam": MSAM()}


def _mlp_and_batches(n_batches=STEPS):
    batches = classification_batches(n_batches, 8, (6,))
    return mlp().double(), [(x.double(), y) for x, y in batches]


def _convnet_and_batches(n_batches, dtype=torch.float64):
    batches = classification_batches(n_batches, 6, (3, 5, 5))
    return bn_convnet().to(dtype), [(x.to(dtype), y) for x, y in batches]


def functional(mode, model, batches, adapter, **options):
    """Params, buffers and state after ``funcsam.sam_step(..., mode=mode)`` (model left untouched);
    ``mode=None`` is SAM on every step."""
    base, lr = ADAPTERS[adapter][1](), ADAPTERS[adapter][2]
    return run_sam_step_with_base(model, batches, rho=RHO, lr=lr, base=base, mode=mode, **options)


def adapted(mode, adapter, model, batches, style="closure", keep_bn=False, **kwargs):
    """``(params, buffers, optimizer)`` of a copy of ``model`` trained by the adapter with ``mode``."""
    model = copy.deepcopy(model)
    optimizer = ADAPTERS[adapter][0](model.parameters(), mode=mode, model=model if keep_bn else None, **kwargs)
    adapter_steps(model, optimizer, batches, style)
    return (*params_and_buffers(model), optimizer)


def _g_v_by_name(optimizer, model):
    saved = optimizer.state_dict()["funcsam"]["looksam_g_v"]
    return {name: saved[index] for index, (name, _) in enumerate(model.named_parameters())}


def _differ(a: dict, b: dict, by: float) -> bool:
    return max(float((a[k] - b[k]).abs().max()) for k in a) > by


# ---------------------------------------------------------------------------------------------------
# Every mode equals its pure form
# ---------------------------------------------------------------------------------------------------


def _cases():
    for mode in MODES:
        for adapter in ADAPTERS:
            styles = ["closure"] + ["davda54_closure"] * (adapter != "samsgd") + ["first_second"] * (mode == "gsam")
            for style in styles:
                yield pytest.param(mode, adapter, style, id=f"{mode}-{adapter}-{style}")


@pytest.mark.parametrize("mode_name,adapter,style", list(_cases()))
def test_adapter_mode_equals_the_pure_mode(mode_name, adapter, style):
    mode = MODES[mode_name]
    model, batches = _mlp_and_batches()
    expected, _, state = functional(mode, model, batches, adapter)
    params, _, optimizer = adapted(mode, adapter, model, batches, style)
    assert_trees_close(params, expected, atol=1e-6)
    assert optimizer.steps_taken == STEPS and optimizer.mode is mode
    if isinstance(mode, LookSAM):
        assert_trees_close(_g_v_by_name(optimizer, model), state.g_v, atol=1e-6)
    full_sam, _, _ = functional(None, model, batches, adapter)
    assert _differ(params, full_sam, by=1e-4)  # the mode did change the trajectory


@cartesian(mode_name=list(MODES), adapter=["samsgd", "sam_adamw"])
def test_adapter_mode_with_batchnorm_keeps_the_pure_modes_buffers(mode_name, adapter):
    """First-pass statistics, as the pure steps; MSAM's only pass is at w + e and its updates are kept."""
    mode = MODES[mode_name]
    model, batches = _convnet_and_batches(4)
    expected, expected_buffers, _ = functional(mode, model, batches, adapter)
    params, buffers, _ = adapted(mode, adapter, model, batches, keep_bn=True)
    assert_trees_close(params, expected, atol=1e-6)
    assert_trees_close(buffers, expected_buffers, atol=1e-6)
    assert int(buffers["1.num_batches_tracked"]) == len(batches)


@cartesian(mode_name=list(MODES), adapter=["samsgd", "sam_adamw"])
def test_max_grad_norm_clips_the_gradient_the_mode_applies(mode_name, adapter):
    mode = MODES[mode_name]
    model, batches = _mlp_and_batches(4)
    expected, _, _ = functional(mode, model, batches, adapter, max_grad_norm=0.1)
    unclipped, _, _ = functional(mode, model, batches, adapter)
    assert _differ(expected, unclipped, by=1e-4)  # clipping was active
    params, _, _ = adapted(mode, adapter, model, batches, max_grad_norm=0.1)
    assert_trees_close(params, expected, atol=1e-6)


@pytest.mark.parametrize("mode_name", list(MODES))
def test_asam_perturbation_matches_the_pure_mode(mode_name):
    mode = MODES[mode_name]
    model, batches = _mlp_and_batches(4)
    expected, _, _ = functional(mode, model, batches, "samsgd", adaptive=True, eta=0.01)
    params, _, _ = adapted(mode, "samsgd", model, batches, adaptive=True, eta=0.01)
    assert_trees_close(params, expected, atol=1e-6)
    assert _differ(params, functional(mode, model, batches, "samsgd")[0], by=1e-6)


def test_gsam_alpha_0_is_sam_bit_for_bit():
    model, batches = _mlp_and_batches(3)
    for adapter in ("samsgd", "sam_adamw"):
        gsam, _, _ = adapted(GSAM(alpha=0.0), adapter, model, batches)
        sam, _, _ = adapted(None, adapter, model, batches)
        assert_trees_equal(gsam, sam)


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@cartesian(mode_name=["every(2)", "looksam(2)", "msam", "gsam"], adapter=["samsgd", "sam_adamw"])
def test_state_dict_round_trip_mid_run_resumes_bit_for_bit(mode_name, adapter):
    mode = ONE_PASS_MODES.get(mode_name) or MODES[mode_name]
    model, batches = _mlp_and_batches()
    straight, _, _ = adapted(mode, adapter, model, batches)

    first = copy.deepcopy(model)
    optimizer = ADAPTERS[adapter][0](first.parameters(), mode=mode)
    adapter_steps(first, optimizer, batches[:3], "closure")
    checkpoint = _round_trip({"model": first.state_dict(), "optimizer": optimizer.state_dict()})
    assert checkpoint["optimizer"]["funcsam"]["steps_taken"] == 3
    assert ("looksam_g_v" in checkpoint["optimizer"]["funcsam"]) == isinstance(mode, LookSAM)

    def resume(optimizer_state):
        resumed = mlp(seed=7).double()
        resumed.load_state_dict(checkpoint["model"])
        optimizer = ADAPTERS[adapter][0](resumed.parameters(), mode=mode)
        optimizer.load_state_dict(optimizer_state)
        adapter_steps(resumed, optimizer, batches[3:], "closure")
        return params_and_buffers(resumed)[0], optimizer.steps_taken

    params, steps_taken = resume(checkpoint["optimizer"])
    assert_trees_equal(params, straight)
    assert steps_taken == STEPS
    if mode_name in ("every(2)", "looksam(2)"):
        # Without the step count the schedule restarts at step 0 (a SAM step where step 3 was not).
        forgetful = {key: value for key, value in checkpoint["optimizer"].items() if key != "funcsam"}
        assert _differ(resume(forgetful)[0], straight, by=1e-6)


def test_bad_funcsam_entry_in_state_dict_is_refused_and_changes_nothing():
    model, batches = _mlp_and_batches(2)
    optimizer = ADAPTERS["samsgd"][0](model.parameters(), mode=LookSAM(k=2))
    adapter_steps(model, optimizer, batches, "closure")
    good = optimizer.state_dict()
    bad_entries = [{"steps_taken": -1, "looksam_g_v": {}}, {"steps_taken": 1.5, "looksam_g_v": {}},
                   {"steps_taken": 1, "looksam_g_v": {0: torch.zeros(2)}},  # the wrong shape
                   {"steps_taken": 1, "looksam_g_v": {9: torch.zeros(2)}}]  # no parameter 9
    for bad in bad_entries:
        with pytest.raises(ValueError, match=r"state_dict\['funcsam'\]"):
            optimizer.load_state_dict({**good, "funcsam": bad})
    assert optimizer.steps_taken == 2


# ---------------------------------------------------------------------------------------------------
# What the adapters guarantee, in every mode
# ---------------------------------------------------------------------------------------------------


def _state_values(optimizer):
    values = [value.clone() for p in optimizer.state for value in optimizer.state[p].values()
              if isinstance(value, torch.Tensor)]
    return values + [g_v.clone() for g_v in optimizer.state_dict()["funcsam"].get("looksam_g_v", {}).values()]


@cartesian(mode_name=list(ONE_PASS_MODES) + ["gsam"], adapter=["samsgd", "sam_adamw"], good_steps=[1, 2])
def test_non_finite_step_is_skipped_with_params_buffers_and_state(mode_name, adapter, good_steps):
    mode = ONE_PASS_MODES.get(mode_name) or GSAM(alpha=0.5)
    model, batches = _convnet_and_batches(good_steps, dtype=torch.float32)
    optimizer = ADAPTERS[adapter][0](model.parameters(), mode=mode, model=model)
    adapter_steps(model, optimizer, batches, "closure")
    (params, buffers), state = params_and_buffers(model), _state_values(optimizer)
    inputs, targets = batches[0]
    inputs = inputs.clone()
    inputs[0, 0, 0, 0] = float("nan")
    adapter_steps(model, optimizer, [(inputs, targets)], "closure")
    assert not bool(optimizer.last_step_finite)
    assert optimizer.steps_taken == good_steps + 1  # a skipped step still counts: the schedule moves on
    assert_trees_equal(params_and_buffers(model)[0], params)
    assert_trees_equal(params_and_buffers(model)[1], buffers)
    after = _state_values(optimizer)
    assert len(after) == len(state) and all(torch.equal(a, b) for a, b in zip(after, state))


def _fp16_steps(model, optimizer, batches, scaler):
    adapter_steps(model, optimizer, batches, "closure", scaler=scaler, autocast_dtype=torch.float16)


@cartesian(mode_name=list(ONE_PASS_MODES) + ["gsam"], adapter=["samsgd", "sam_adamw"])
def test_grad_scaler_matches_unscaled_and_skips_overflow(mode_name, adapter):
    mode = ONE_PASS_MODES.get(mode_name) or GSAM(alpha=0.5)
    model, batches = mlp(), classification_batches(3, 8, (6,))
    unscaled = copy.deepcopy(model)
    _fp16_steps(unscaled, ADAPTERS[adapter][0](unscaled.parameters(), mode=mode), batches, None)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    optimizer = ADAPTERS[adapter][0](model.parameters(), mode=mode)
    _fp16_steps(model, optimizer, batches, scaler)
    assert bool(optimizer.last_step_finite) and scaler.get_scale() == 2.0**10
    assert_trees_close(params_and_buffers(model)[0], params_and_buffers(unscaled)[0], atol=1e-6)

    params, state = params_and_buffers(model)[0], _state_values(optimizer)
    scaler.update(new_scale=2.0**40)  # the backward of the fp16 matmuls overflows (max 65504)
    _fp16_steps(model, optimizer, batches[:1], scaler)
    assert not bool(optimizer.last_step_finite) and scaler.get_scale() == 2.0**39
    assert_trees_equal(params_and_buffers(model)[0], params)
    assert all(torch.equal(a, b) for a, b in zip(_state_values(optimizer), state))


# mode: (steps before the one that fails, the closure call of that step that raises: the pass at w + e)
FAILING_PASS = {"msam": (MSAM(), 1, 1), "gsam": (GSAM(alpha=0.5), 0, 2), "looksam": (LookSAM(k=2), 2, 2)}


@cartesian(mode_name=list(FAILING_PASS), adapter=["samsgd", "sam_adamw"])
def test_closure_raising_at_w_plus_e_leaves_params_and_buffers_at_w(mode_name, adapter):
    mode, good_steps, failing_call = FAILING_PASS[mode_name]
    model, batches = _convnet_and_batches(good_steps + 1, dtype=torch.float32)
    optimizer = ADAPTERS[adapter][0](model.parameters(), mode=mode, model=model)
    adapter_steps(model, optimizer, batches[:good_steps], "closure")
    before = params_and_buffers(model)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == failing_call:
            raise KeyboardInterrupt("interrupted in the perturbed pass")
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batches[-1][0]), batches[-1][1])
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        optimizer.step(closure)
    assert_trees_equal(params_and_buffers(model)[0], before[0])
    assert_trees_equal(params_and_buffers(model)[1], before[1])
    assert optimizer.steps_taken == good_steps
    adapter_steps(model, optimizer, batches[-1:], "closure")  # and the optimizer is usable afterwards
    assert bool(optimizer.last_step_finite)


def test_gsam_leaves_its_direction_in_p_grad():
    model, batches = _mlp_and_batches(1)
    (inputs, targets), alpha = batches[0], 0.5
    params = list(model.parameters())
    gradient = lambda: torch.autograd.grad(F.cross_entropy(model(inputs), targets), params)  # noqa: E731
    g = gradient()
    norm = torch.sqrt(sum((x * x).sum() for x in g))
    with torch.no_grad():
        for p, x in zip(params, g):
            p.add_(RHO * x / (norm + 1e-12))
    g_sam = gradient()
    parallel = sum((x * y).sum() for x, y in zip(g, g_sam)) / sum((y * y).sum() for y in g_sam)
    expected = [y - alpha * (x - parallel * y) for x, y in zip(g, g_sam)]

    _, _, optimizer = adapted(GSAM(alpha=alpha), "samsgd", mlp().double(), batches)
    for p, d in zip(optimizer.param_groups[0]["params"], expected):
        torch.testing.assert_close(p.grad, d, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------


@cartesian(mode_name=list(ONE_PASS_MODES), adapter=["samsgd", "sam_adamw"])
def test_first_and_second_step_refuse_one_pass_modes(mode_name, adapter):
    model, batches = _mlp_and_batches(1)
    optimizer = ADAPTERS[adapter][0](model.parameters(), mode=ONE_PASS_MODES[mode_name])
    before = params_and_buffers(model)[0]
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    with pytest.raises(RuntimeError, match=r"first_step\(\) .* call loss = optimizer.step\(closure\)"):
        optimizer.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match=r"second_step\(\) .* optimizer.step\(closure\)"):
        optimizer.second_step(zero_grad=True)
    assert_trees_equal(params_and_buffers(model)[0], before)


@pytest.mark.parametrize("make,error,match", [
    (lambda: LookSAM(k=0), ValueError, r"k must be an int >= 1"),
    (lambda: LookSAM(k=2.0), TypeError, r"k must be an int"),
    (lambda: LookSAM(k=True), TypeError, r"k must be an int"),
    (lambda: LookSAM(alpha=-0.1), ValueError, r"alpha must be >= 0"),
    (lambda: GSAM(alpha=float("nan")), ValueError, r"alpha must be a finite number"),
    (lambda: GSAM(alpha=torch.tensor(0.5)), TypeError, r"alpha must be a Python number"),
], ids=["looksam-k-0", "looksam-k-float", "looksam-k-bool", "looksam-alpha-negative", "gsam-alpha-nan",
        "gsam-alpha-tensor"])
def test_bad_mode_fields_are_refused_by_name(make, error, match):
    with pytest.raises(error, match=match):
        make()


@cartesian(adapter=["samsgd", "sam_adamw"], mode=["msam-string", "MSAM-class", "LookSAM-class", "every-function",
                                                   "int", "Every-class"])
def test_bad_mode_is_refused_at_construction(adapter, mode):
    value, match = {
        "msam-string": ("msam", r"mode must be None .* got str 'msam'"),
        "MSAM-class": (MSAM, r"mode=funcsam.MSAM\(\), not MSAM itself"),
        "LookSAM-class": (LookSAM, r"mode=funcsam.LookSAM\(k=5, alpha=0.7\)"),
        "every-function": (funcsam.every, r"mode=funcsam.every\(5\), not every itself"),
        "Every-class": (modes.Every, r"mode=funcsam.every\(5\), not Every itself"),
        "int": (3, r"mode must be None .* got int 3"),
    }[mode]
    with pytest.raises(TypeError, match=match):
        ADAPTERS[adapter][0](mlp().parameters(), mode=value)


def test_mode_objects_are_frozen_and_compare_by_value():
    mode = LookSAM(k=3)
    with pytest.raises(AttributeError):
        mode.k = 4
    assert mode == LookSAM(k=3, alpha=0.7) and MSAM() == MSAM()
    assert [mode.takes_sam(t) for t in range(7)] == [modes.every(3).takes_sam(t) for t in range(7)]


def test_msam_without_momentum_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match=r"MSAM\(\) .* with momentum=0.* has none"):
        funcsam.SAMSGD(model.parameters(), lr=0.1, mode=MSAM())
    with pytest.raises(ValueError, match=r"MSAM\(\) .* param group 0 with momentum=0 has none"):
        funcsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, mode=MSAM())  # SGD's default momentum is 0
    for optimizer in (funcsam.SAMSGD(model[0].parameters(), lr=0.1, momentum=0.9, mode=MSAM()),
                      funcsam.SAM(model[0].parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, mode=MSAM())):
        with pytest.raises(ValueError, match=r"the param group with momentum=0.0 has none"):
            optimizer.add_param_group({"params": list(model[2].parameters()), "momentum": 0.0})
        assert len(optimizer.param_groups) == 1


def test_msam_over_an_optimizer_without_momentum_state_is_refused_at_the_step():
    model, batches = _mlp_and_batches(1)
    # Adagrad creates its state (step, sum) in its constructor, so the first step already knows.
    optimizer = funcsam.SAM(model.parameters(), torch.optim.Adagrad, rho=RHO, lr=0.1, mode=MSAM())
    before = params_and_buffers(model)[0]
    with pytest.raises(RuntimeError, match=r"Adagrad keeps neither .*state holds step, sum"):
        adapter_steps(model, optimizer, batches, "closure")
    assert_trees_equal(params_and_buffers(model)[0], before)
