"""RST, every(k, scale_rho=True), K-SAM (TopK) and ESAM's selection (SDS) against their formulas
written out by hand, in both APIs where they fit, and their trainer flags.

The reference steps a copy of the model with plain torch.autograd and torch.optim.SGD: per step,
either SAM's two passes (e = rho_t * g / (||g|| + eps), then g_sam at w + e) on the examples the
step trains on, or the base step with g; nothing of funcsam's.
"""

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import funcsam
import train.cifar10 as cifar10
from helpers import adapter_steps, assert_trees_close, classification_batches, mlp, params_and_buffers
from train.checkpoint import CHECKPOINT_NAME, load_checkpoint

EPS = 1e-12
RHO = 0.1
LR = 0.1
SGD_HYPER = dict(momentum=0.9, weight_decay=5e-4)


def _norm(tensors):
    return torch.sqrt(sum((t * t).sum() for t in tensors))


def reference(model, batches, plan):
    """Params after SGD over ``batches``, step t following ``plan(t, model, batch) -> (rho_t or None, batch_t)``:
    rho_t None is the base step on the whole batch, else SAM with radius rho_t on ``batch_t``. A third
    element ``second(model)`` (called with the model at w + e) gives the second pass its own batch."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=LR, **SGD_HYPER)

    def gradient(inputs, targets):
        return torch.autograd.grad(F.cross_entropy(model(inputs), targets), params)

    for step, batch in enumerate(batches):
        rho, (inputs, targets), *second = plan(step, model, batch)
        g = gradient(inputs, targets)
        if rho is not None:
            w = [p.detach().clone() for p in params]
            with torch.no_grad():
                norm = _norm(g)
                for p, gi in zip(params, g):
                    p.add_(rho * gi / (norm + EPS))
            g = gradient(*(second[0](model) if second else (inputs, targets)))
            with torch.no_grad():
                for p, wi in zip(params, w):
                    p.copy_(wi)
        for p, gi in zip(params, g):
            p.grad = gi.detach().clone()
        optimizer.step()
    return params_and_buffers(model)[0]


def functional(model, batches, mode=None, source=None):
    """Params after ``funcsam.sam_step`` with ``mode`` and ``source``, step t taking SAM where the mode says."""
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    base = funcsam.sgd(**SGD_HYPER)
    mode = funcsam.modes.check_mode(mode)
    state = mode.init_state(base, params)
    for step, batch in enumerate(batches):
        out = funcsam.sam_step(params, buffers, batch, loss_fn, RHO, LR, state, base=base, mode=mode,
                               take_sam=mode.takes_sam(step, state), source=source)
        params, buffers, state = out.params, out.buffers, out.momentum_state
    return params


def adapted(model, batches, mode, optimizer_name="samsgd"):
    """Params after the closure-style optimizer ``optimizer_name`` with ``mode``, and the optimizer."""
    model = copy.deepcopy(model)
    if optimizer_name == "samsgd":
        optimizer = funcsam.SAMSGD(model.parameters(), lr=LR, rho=RHO, mode=mode, **SGD_HYPER)
    else:
        optimizer = funcsam.SAM(model.parameters(), torch.optim.SGD, lr=LR, rho=RHO, mode=mode, **SGD_HYPER)
    adapter_steps(model, optimizer, batches, "closure")
    return params_and_buffers(model)[0], optimizer


def _differ(a, b, by=1e-4):
    return max(float((a[k] - b[k]).abs().max()) for k in a) > by


# ---------------------------------------------------------------------------------------------------
# RST: randomized switching
# ---------------------------------------------------------------------------------------------------


def test_rst_takes_sam_on_a_fraction_p_of_the_steps():
    steps = 20_000  # the binomial's standard deviation is <= 0.0036 of the steps
    for p in (0.1, 0.5, 0.9):
        fraction = sum(funcsam.RST(p, seed=3).takes_sam(t) for t in range(steps)) / steps
        assert abs(fraction - p) < 0.015, (p, fraction)
    assert not any(funcsam.RST(0.0).takes_sam(t) for t in range(1000))
    assert all(funcsam.RST(1.0).takes_sam(t) for t in range(1000))


def test_rst_linear_schedule_rises_from_p_to_p_end_and_holds():
    mode = funcsam.RST(0.1, seed=1, p_end=0.9, total_steps=10_000)
    assert [mode.probability(t) for t in (0, 5_000, 10_000, 20_000)] == pytest.approx([0.1, 0.5, 0.9, 0.9])
    for start, expected in ((0, 0.18), (8_000, 0.82)):  # mean p_t over each window of 2000 steps
        fraction = sum(mode.takes_sam(t) for t in range(start, start + 2_000)) / 2_000
        assert abs(fraction - expected) < 0.03, (start, fraction)
    tail = sum(mode.takes_sam(t) for t in range(10_000, 14_000)) / 4_000
    assert abs(tail - 0.9) < 0.02


def test_rst_decisions_are_a_function_of_seed_and_step_only():
    a, b = funcsam.RST(0.5, seed=7), funcsam.RST(0.5, seed=7)
    forward = [a.takes_sam(t) for t in range(200)]
    backward = [b.takes_sam(t) for t in reversed(range(200))][::-1]  # asked in another order
    assert forward == backward
    assert forward != [funcsam.RST(0.5, seed=8).takes_sam(t) for t in range(200)]
    draws = [funcsam.modes.uniform_draw(7, t) for t in range(1000)]
    assert all(0 <= u < 1 for u in draws) and len(set(draws)) == 1000
    # The mixer is SplitMix64: its published first output from state 0 (Vigna's splitmix64.c) pins it,
    # since a change of the hash would silently change every resumed run's decisions.
    from funcsam.modes.randomized import _splitmix64
    assert _splitmix64(0) == 0xE220A8397B1DCDAF


def _rst_plan(mode):
    return lambda step, model, batch: (RHO if mode.takes_sam(step) else None, batch)


@pytest.mark.parametrize("mode", [funcsam.RST(0.5, seed=2), funcsam.RST(0.2, seed=5, p_end=1.0, total_steps=6)],
                         ids=["rst", "rst-linear"])
def test_rst_matches_the_hand_written_reference_in_both_apis(mode):
    model, batches = mlp().double(), [(x.double(), y) for x, y in classification_batches(8, 8, (6,))]
    pattern = [mode.takes_sam(t) for t in range(8)]
    assert any(pattern) and not all(pattern)  # both kinds of step are exercised
    expected = reference(model, batches, _rst_plan(mode))
    assert_trees_close(functional(model, batches, mode), expected, atol=1e-9)
    for name in ("samsgd", "sam_sgd"):
        params, optimizer = adapted(model, batches, mode, name)
        assert_trees_close(params, expected, atol=1e-9)
        assert optimizer.steps_taken == 8
    assert _differ(expected, functional(model, batches))  # not full SAM


def test_rst_resumes_from_a_state_dict_with_the_same_decisions():
    mode = funcsam.RST(0.5, seed=4)
    model, batches = mlp().double(), [(x.double(), y) for x, y in classification_batches(8, 8, (6,))]
    straight, _ = adapted(model, batches, mode)
    first = copy.deepcopy(model)
    optimizer = funcsam.SAMSGD(first.parameters(), lr=LR, rho=RHO, mode=mode, **SGD_HYPER)
    adapter_steps(first, optimizer, batches[:3], "closure")
    resumed_model = copy.deepcopy(first)
    resumed = funcsam.SAMSGD(resumed_model.parameters(), lr=LR, rho=RHO, mode=funcsam.RST(0.5, seed=4), **SGD_HYPER)
    resumed.load_state_dict(optimizer.state_dict())
    adapter_steps(resumed_model, resumed, batches[3:], "closure")
    assert_trees_close(params_and_buffers(resumed_model)[0], straight, atol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(p=1.5), ValueError, r"p must be a probability"),
    (dict(p=float("nan")), ValueError, r"p must be a probability"),
    (dict(p=True), ValueError, r"p must be a probability"),
    (dict(p=0.5, seed=1.5), TypeError, r"seed must be an int"),
    (dict(p=0.5, p_end=-0.1, total_steps=10), ValueError, r"p_end must be a probability"),
    (dict(p=0.5, p_end=0.9), TypeError, r"total_steps must be an int .*required with p_end"),
    (dict(p=0.5, p_end=0.9, total_steps=0), ValueError, r"total_steps must be an int >= 1"),
    (dict(p=0.5, total_steps=10), ValueError, r"total_steps is only used with p_end"),
])
def test_bad_rst_fields_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        funcsam.RST(**kwargs)


def test_rst_refuses_bad_steps_and_the_two_halves_style():
    with pytest.raises(ValueError, match=r"step must be an int >= 0"):
        funcsam.RST(0.5).takes_sam(-1)
    with pytest.raises(TypeError, match=r"step must be an int"):
        funcsam.RST(0.5).takes_sam(1.0)
    optimizer = funcsam.SAMSGD(mlp().parameters(), lr=LR, mode=funcsam.RST(0.5))
    with pytest.raises(RuntimeError, match=r"decides per step how many passes"):
        optimizer.first_step()


# ---------------------------------------------------------------------------------------------------
# every(k, scale_rho=True): rho * k on the SAM steps
# ---------------------------------------------------------------------------------------------------


def _float64_mlp_and_batches(n=7):
    return mlp().double(), [(x.double(), y) for x, y in classification_batches(n, 8, (6,))]


def test_every_with_scaled_rho_matches_the_hand_written_reference_in_both_apis():
    mode = funcsam.every(3, scale_rho=True)
    assert mode.rho_scale == 3.0 and funcsam.every(3).rho_scale == 1.0
    model, batches = _float64_mlp_and_batches()
    expected = reference(model, batches, lambda step, model, batch: (3 * RHO if step % 3 == 0 else None, batch))
    assert_trees_close(functional(model, batches, mode), expected, atol=1e-9)
    for name in ("samsgd", "sam_sgd"):
        assert_trees_close(adapted(model, batches, mode, name)[0], expected, atol=1e-9)
    assert _differ(expected, functional(model, batches, funcsam.every(3)))  # rho * k is not rho


def test_every_1_with_scaled_rho_is_full_sam_exactly():
    model, batches = _float64_mlp_and_batches(3)
    scaled, full = functional(model, batches, funcsam.every(1, scale_rho=True)), functional(model, batches)
    assert all(torch.equal(scaled[k], full[k]) for k in full)


@dataclasses.dataclass(frozen=True)
class DoubledMSAM(funcsam.MSAM):
    rho_scale = 2.0


@dataclasses.dataclass(frozen=True)
class DoubledGSAM(funcsam.GSAM):
    rho_scale = 2.0


@pytest.mark.parametrize("scaled, plain", [(DoubledMSAM(), funcsam.MSAM()), (DoubledGSAM(0.3), funcsam.GSAM(0.3))],
                         ids=["msam", "gsam"])
def test_every_path_that_perturbs_reads_the_modes_rho_scale(scaled, plain):
    """A mode's rho_scale is rho times it wherever rho is used: the pure step, the closure, MSAM's
    ascent along the momentum, and first_step/second_step (GSAM takes both styles)."""
    model, batches = _float64_mlp_and_batches(4)
    base = funcsam.sgd(**SGD_HYPER)

    def pure(mode, rho):
        params, buffers = params_and_buffers(model)
        loss_fn, state = funcsam.make_loss_fn(model, F.cross_entropy), mode.init_state(base, params)
        for batch in batches:
            out = funcsam.sam_step(params, buffers, batch, loss_fn, rho, LR, state, base=base, mode=mode)
            params, buffers, state = out.params, out.buffers, out.momentum_state
        return params

    def stateful(mode, rho, style):
        copied = copy.deepcopy(model)
        optimizer = funcsam.SAM(copied.parameters(), torch.optim.SGD, lr=LR, rho=rho, mode=mode, **SGD_HYPER)
        adapter_steps(copied, optimizer, batches, style)
        return params_and_buffers(copied)[0]

    expected = pure(plain, 2 * RHO)
    assert_trees_close(pure(scaled, RHO), expected, atol=1e-12)
    for style in ["closure", "davda54_closure"] + ["first_second"] * scaled.two_halves:
        assert_trees_close(stateful(scaled, RHO, style), stateful(plain, 2 * RHO, style), atol=1e-12)
    assert _differ(expected, pure(plain, RHO))


def test_scale_rho_must_be_a_bool():
    with pytest.raises(TypeError, match=r"scale_rho must be a bool"):
        funcsam.every(3, scale_rho=1)
    with pytest.raises(TypeError, match=r"scale_rho must be a bool"):
        funcsam.every(3, scale_rho="yes")


# ---------------------------------------------------------------------------------------------------
# K-SAM: both passes on the k examples of highest loss
# ---------------------------------------------------------------------------------------------------


def _per_example_loss(model):
    return funcsam.make_loss_fn(model, lambda logits, y: F.cross_entropy(logits, y, reduction="none"))


def _losses_one_by_one(model, batch):
    inputs, targets = batch
    with torch.no_grad():
        return [float(F.cross_entropy(model(inputs[i:i + 1]), targets[i:i + 1])) for i in range(len(targets))]


def _examples_by_score(batch, scores, k):
    """The k examples of largest ``scores``, by sorting (not torch.topk)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
    return batch[0][order], batch[1][order]


def _highest_loss_examples(model, batch, k):
    return _examples_by_score(batch, _losses_one_by_one(model, batch), k)


def test_ksam_matches_the_hand_written_reference():
    model, batches = _float64_mlp_and_batches(5)
    k = 3
    expected = reference(model, batches, lambda step, model, batch: (RHO, _highest_loss_examples(model, batch, k)))
    source = funcsam.TopK(k, _per_example_loss(model))
    assert_trees_close(functional(model, batches, source=source), expected, atol=1e-9)
    assert _differ(expected, functional(model, batches))  # not SAM on the whole batch


def _sds_plan(k):
    def plan(step, model, batch):
        at_w = _losses_one_by_one(model, batch)

        def rising_most(model_at_w_plus_e):
            at_w_plus_e = _losses_one_by_one(model_at_w_plus_e, batch)
            return _examples_by_score(batch, [b - a for a, b in zip(at_w, at_w_plus_e)], k)

        return RHO, batch, rising_most
    return plan


def test_sds_matches_the_hand_written_reference():
    model, batches = _float64_mlp_and_batches(5)
    expected = reference(model, batches, _sds_plan(3))
    source = funcsam.SDS(3, _per_example_loss(model))
    assert_trees_close(functional(model, batches, source=source), expected, atol=1e-9)
    assert _differ(expected, functional(model, batches))  # not SAM on the whole batch
    # nor K-SAM's second pass: the examples whose loss rises most are not those of highest loss
    assert _differ(expected, reference(model, batches, lambda step, model, batch: (
        RHO, batch, lambda perturbed: _highest_loss_examples(perturbed, batch, 3))))


def test_ksam_reports_the_whole_batchs_loss_and_logits():
    model, (batch,) = mlp(), classification_batches(1, 8, (6,))
    params, buffers = params_and_buffers(model)
    out = funcsam.sam_step(params, buffers, batch, funcsam.make_loss_fn(model, F.cross_entropy), RHO, LR,
                           funcsam.init_momentum(params), source=funcsam.TopK(2, _per_example_loss(model)))
    with torch.no_grad():
        logits = model(batch[0])
    torch.testing.assert_close(out.aux, logits)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, batch[1]))


def test_ksam_in_the_optimizers_is_a_step_on_the_selected_examples():
    """With the optimizers K-SAM is a loop of the user's: select with funcsam.top_k_examples, then step."""
    model, batches = _float64_mlp_and_batches(5)
    k = 3
    expected = reference(model, batches, lambda step, model, batch: (RHO, _highest_loss_examples(model, batch, k)))
    trained = copy.deepcopy(model)
    optimizer = funcsam.SAMSGD(trained.parameters(), lr=LR, rho=RHO, **SGD_HYPER)
    for inputs, targets in batches:
        with torch.no_grad():
            losses = F.cross_entropy(trained(inputs), targets, reduction="none")
        selected_inputs, selected_targets = funcsam.top_k_examples((inputs, targets), losses, k)

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(trained(selected_inputs), selected_targets)
            loss.backward()
            return loss

        optimizer.step(closure)
    assert_trees_close(params_and_buffers(trained)[0], expected, atol=1e-9)


def test_bad_ksam_inputs_are_refused_by_name():
    model, (batch,) = mlp(), classification_batches(1, 4, (6,))
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    with pytest.raises(ValueError, match=r"k must be an int >= 1"):
        funcsam.TopK(0, _per_example_loss(model))
    with pytest.raises(TypeError, match=r"k must be an int"):
        funcsam.TopK(2.0, _per_example_loss(model))
    with pytest.raises(TypeError, match=r"per_example_loss must be callable"):
        funcsam.TopK(2, None)
    with pytest.raises(ValueError, match=r"TopK\(k=5\) needs batches of at least k examples, got a batch of 4"):
        funcsam.sam_step(params, buffers, batch, loss_fn, RHO, LR, funcsam.init_momentum(params),
                         source=funcsam.TopK(5, _per_example_loss(model)))
    with pytest.raises(ValueError, match=r"one loss per example, a tensor of shape \(4,\), got shape \(\)"):
        funcsam.sam_step(params, buffers, batch, loss_fn, RHO, LR, funcsam.init_momentum(params),
                         source=funcsam.TopK(2, loss_fn))  # a mean-reduced loss
    with pytest.raises(ValueError, match=r"SDS\(k=5\) needs batches of at least k examples"):
        funcsam.sam_step(params, buffers, batch, loss_fn, RHO, LR, funcsam.init_momentum(params),
                         source=funcsam.SDS(5, _per_example_loss(model)))
    with pytest.raises(TypeError, match=r"per_example_loss must be callable"):
        funcsam.SDS(2, "loss")
    with pytest.raises(ValueError, match=r"k=5 is more than the batch's 4 examples"):
        funcsam.top_k_examples(batch, torch.zeros(4), 5)


# ---------------------------------------------------------------------------------------------------
# The trainer's --sam-mode values
# ---------------------------------------------------------------------------------------------------


def _trainer_run(out, *flags):
    argv = ["--dataset", "synthetic", "--model", "tiny", "--synthetic-size", "256", "--batch-size", "32",
            "--epochs", "2", "--warmup-epochs", "1", "--limit-steps", "4", "--device", "cpu", "--out", str(out),
            "--no-channels-last", *flags]
    assert cifar10.main(argv) == 0
    return load_checkpoint(out / CHECKPOINT_NAME)["params"]


@pytest.mark.parametrize("flags", [
    ["--sam-mode", "rst", "--rst-p", "0.2", "--rst-p-end", "0.9"],
    ["--sam-mode", "every", "--sam-every", "3", "--sam-rho-scale"],
], ids=["rst", "every-rho-scale"])
def test_trainer_mode_takes_the_same_steps_in_both_apis(tmp_path, flags):
    functional_params = _trainer_run(tmp_path / "functional", "--api", "functional", *flags)
    adapter_params = _trainer_run(tmp_path / "adapter", "--api", "adapter", *flags)
    for name in functional_params:
        torch.testing.assert_close(functional_params[name], adapter_params[name], rtol=1e-3, atol=1e-4)
    full_sam = _trainer_run(tmp_path / "full", "--api", "functional")
    assert _differ(functional_params, full_sam)  # the mode did change the steps
    recorded = json.loads((tmp_path / "functional" / "args.json").read_text())
    assert recorded["sam_mode"] == flags[1]


@pytest.mark.parametrize("argv", [
    ["--sam-mode", "rst", "--rst-p", "1.5"], ["--sam-mode", "rst", "--rst-p-end", "nan"],
    ["--sam-mode", "rst", "--optim", "sgd"], ["--sam-mode", "looksam", "--sam-rho-scale"], ["--sam-rho-scale"],
    ["--sam-mode", "ksam", "--select-k", "0"], ["--sam-mode", "ksam", "--batch-size", "32", "--select-k", "33"],
    ["--sam-mode", "ksam", "--api", "adapter"], ["--sam-mode", "ksam", "--accumulate", "2"], ["--select-k", "4"],
    ["--sam-mode", "sds", "--api", "adapter"], ["--sam-mode", "sds", "--m-sharpness", "2"],
])
def test_trainer_refuses_bad_mode_flags(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cifar10.parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("mode, default_k", [("ksam", 32), ("sds", 64)])
def test_trainer_selecting_modes_train_in_the_functional_api(tmp_path, mode, default_k):
    params = _trainer_run(tmp_path / mode, "--sam-mode", mode, "--select-k", "8")
    recorded = json.loads((tmp_path / mode / "args.json").read_text())
    assert (recorded["sam_mode"], recorded["select_k"]) == (mode, 8)
    assert _differ(params, _trainer_run(tmp_path / "full", "--api", "functional"))
    assert cifar10.parse_args(["--sam-mode", mode, "--batch-size", "128"]).select_k == default_k
