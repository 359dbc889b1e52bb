"""SAM-ON (funcsam.sam_on, sam_step's perturb_mask, the adapters' perturb=False groups) against a
hand-written reference on the BatchNorm convnet of helpers.py.

The reference perturbs the BatchNorm weights and biases only, by rho * g_N / (||g_N|| + eps) with
the norm over them alone, steps a copy of the model with plain torch.autograd, puts the
BatchNorm statistics of the perturbed pass back, and applies SGD with momentum by hand.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import funcsam
from funcsam import sam_on
from funcsam.distributed import SyncBatchNorm
from helpers import (
    ADAPTER_STYLES, adapter_steps, assert_trees_close, assert_trees_equal, bn_convnet, classification_batches, mlp,
    params_and_buffers,
)

RHO, LR, MOMENTUM, WEIGHT_DECAY, EPS, STEPS = 0.5, 0.1, 0.9, 5e-4, 1e-12, 3
BN_CONVNET_NORM_PARAMS = {"1.weight", "1.bias", "4.weight", "4.bias"}


def _batches():
    return classification_batches(STEPS, 8, (3, 6, 6))


def reference_sam_on(model, batches, *, adaptive=False, eta=0.0):
    """SAM-ON + torch.optim.SGD(momentum, weight_decay) by hand on ``bn_convnet``: (params, buffers)."""
    model = copy.deepcopy(model)
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    perturbed = [name in BN_CONVNET_NORM_PARAMS for name in names]
    momentum_buffers = [None] * len(params)

    def gradient(inputs, targets):
        return torch.autograd.grad(F.cross_entropy(model(inputs), targets), params)

    for inputs, targets in batches:
        g = gradient(inputs, targets)
        first_pass_buffers = [b.clone() for b in model.buffers()]
        with torch.no_grad():
            w = [p.clone() for p in params]
            t = [p.abs() + eta if adaptive else torch.ones_like(p) for p in params]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi, on in zip(t, g, perturbed) if on))
            for p, ti, gi, on in zip(params, t, g, perturbed):
                if on:
                    p.add_(RHO * ti * ti * gi / (norm + EPS))
        g_sam = gradient(inputs, targets)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), first_pass_buffers):
                b.copy_(saved)
            for i, (p, wi, gi) in enumerate(zip(params, w, g_sam)):
                p.copy_(wi)
                d = gi + WEIGHT_DECAY * p
                momentum_buffers[i] = d.clone() if momentum_buffers[i] is None else MOMENTUM * momentum_buffers[i] + d
                p.sub_(LR * momentum_buffers[i])
    return params_and_buffers(model)


def _run_sam_step(model, batches, **options):
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    base = funcsam.sgd(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    state = base.init(params)
    for batch in batches:
        out = funcsam.sam_step(params, buffers, batch, loss_fn, RHO, LR, state, base=base, **options)
        params, buffers, state = out.params, out.buffers, out.momentum_state
    return params, buffers, state


# ---------------------------------------------------------------------------------------------------
# Which parameters are a normalisation layer's
# ---------------------------------------------------------------------------------------------------


def test_norm_layer_mask_marks_the_norm_layers_parameters():
    mask = sam_on.norm_layer_mask(bn_convnet())
    assert {name for name, on in mask.items() if on} == BN_CONVNET_NORM_PARAMS
    assert list(mask) == [name for name, _ in bn_convnet().named_parameters()]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.RMSNorm(4),
                          nn.Sequential(nn.Unflatten(1, (4, 1)), nn.InstanceNorm1d(4, affine=True)),
                          nn.Flatten(), SyncBatchNorm(4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    mask = sam_on.norm_layer_mask(model)
    assert {name for name, on in mask.items() if on} == {
        "1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "4.1.weight", "4.1.bias", "6.weight", "6.bias"}
    assert not mask["0.weight"] and not mask["8.bias"]
    assert not any(sam_on.norm_layer_mask(mlp()).values())
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
        sam_on.norm_layer_mask({"w": torch.zeros(2)})


def test_sam_on_param_groups_split_norm_layers_from_the_rest():
    model = bn_convnet()
    norm_group, rest_group = sam_on.sam_on_param_groups(model, rho=0.3, weight_decay=1e-4)
    named = dict(model.named_parameters())
    assert norm_group["perturb"] is True and rest_group["perturb"] is False
    assert [id(p) for p in norm_group["params"]] == [id(named[k]) for k in ("1.weight", "1.bias", "4.weight", "4.bias")]
    assert len(norm_group["params"]) + len(rest_group["params"]) == len(named)
    assert norm_group["rho"] == rest_group["rho"] == 0.3 and rest_group["weight_decay"] == 1e-4

    (only,) = sam_on.sam_on_param_groups(nn.LayerNorm(3))  # the empty group is left out
    assert only["perturb"] is True
    with pytest.raises(ValueError, match=r"no parameter in a normalisation layer"):
        sam_on.sam_on_param_groups(mlp())
    with pytest.raises(ValueError, match=r"perturb cannot be a group option"):
        sam_on.sam_on_param_groups(model, perturb=False)


# ---------------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_step_with_norm_layer_mask_matches_hand_written_reference(adaptive):
    model, batches = bn_convnet(), _batches()
    mask = sam_on.norm_layer_mask(model)
    params, buffers, _ = _run_sam_step(model, batches, perturb_mask=mask, adaptive=adaptive, eta=0.01)
    expected_params, expected_buffers = reference_sam_on(model, batches, adaptive=adaptive, eta=0.01)
    assert_trees_close(params, expected_params, atol=1e-6)
    assert_trees_close(buffers, expected_buffers, atol=1e-6)
    full, _, _ = _run_sam_step(model, batches, adaptive=adaptive, eta=0.01)
    assert max((params[k] - full[k]).abs().max().item() for k in params) > 1e-4  # the mask does matter


def test_grad_norm_is_the_norm_over_the_masked_leaves():
    model, (batch,) = bn_convnet(), _batches()[:1]
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    out = funcsam.sam_step(params, buffers, batch, loss_fn, RHO, LR, funcsam.init_momentum(params),
                           perturb_mask=sam_on.norm_layer_mask(model))
    g = dict(zip([k for k, _ in model.named_parameters()],
                 torch.autograd.grad(F.cross_entropy(model(batch[0]), batch[1]), list(model.parameters()))))
    expected = torch.sqrt(sum((g[k] ** 2).sum() for k in BN_CONVNET_NORM_PARAMS))
    torch.testing.assert_close(out.grad_norm, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("style", ["first_second", "closure"])
def test_samsgd_with_sam_on_param_groups_matches_hand_written_reference(style):
    model, batches = bn_convnet(), _batches()
    expected_params, expected_buffers = reference_sam_on(model, batches)
    trained = copy.deepcopy(model)
    optimizer = funcsam.SAMSGD(sam_on.sam_on_param_groups(trained), lr=LR, momentum=MOMENTUM,
                               weight_decay=WEIGHT_DECAY, rho=RHO, model=trained)
    adapter_steps(trained, optimizer, batches, style)
    params, buffers = params_and_buffers(trained)
    assert_trees_close(params, expected_params, atol=1e-6)
    assert_trees_close(buffers, expected_buffers, atol=1e-6)


@pytest.mark.parametrize("style", ADAPTER_STYLES)
def test_sam_over_torch_sgd_with_sam_on_param_groups_matches_hand_written_reference(style):
    model, batches = bn_convnet(), _batches()
    expected_params, expected_buffers = reference_sam_on(model, batches)
    trained = copy.deepcopy(model)
    optimizer = funcsam.SAM(sam_on.sam_on_param_groups(trained), torch.optim.SGD, rho=RHO, lr=LR,
                            momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, model=trained)
    adapter_steps(trained, optimizer, batches, style)
    params, buffers = params_and_buffers(trained)
    assert_trees_close(params, expected_params, atol=1e-6)
    assert_trees_close(buffers, expected_buffers, atol=1e-6)


def test_all_true_mask_is_sam_step_exactly():
    model, batches = bn_convnet(), _batches()
    all_true = {name: True for name, _ in model.named_parameters()}
    masked = _run_sam_step(model, batches, perturb_mask=all_true)
    plain = _run_sam_step(model, batches)
    assert_trees_equal(masked[0], plain[0])
    assert_trees_equal(masked[1], plain[1])
    assert_trees_equal(masked[2].momentum_buffer, plain[2].momentum_buffer)


# ---------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------


def test_bad_masks_are_refused():
    model, (batch,) = bn_convnet(), _batches()[:1]
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    mask = sam_on.norm_layer_mask(model)

    def step(perturb_mask):
        return funcsam.sam_step(params, buffers, batch, loss_fn, RHO, LR, funcsam.init_momentum(params),
                                perturb_mask=perturb_mask)

    missing = {k: v for k, v in mask.items() if k != "8.bias"}
    extra = dict(mask, **{"9.weight": False})
    for wrong in (missing, extra, list(mask.values()), {k: [v] for k, v in mask.items()}, True):
        with pytest.raises(ValueError, match=r"perturb_mask must have the structure of params"):
            step(wrong)
    for leaf in (torch.tensor(True), 1, 0.0, "yes"):
        with pytest.raises(TypeError, match=r"perturb_mask must hold Python bools, got .* at '1.weight'"):
            step(dict(mask, **{"1.weight": leaf}))
    with pytest.raises(ValueError, match=r"perturb_mask is False everywhere"):
        step({k: False for k in mask})


def test_adapter_refuses_groups_that_perturb_nothing_or_a_non_bool_perturb():
    model, (batch,) = bn_convnet(), _batches()[:1]
    for groups, error, message in [
        ([{"params": list(model.parameters()), "perturb": False}], ValueError, r"every param group .* perturb=False"),
        ([{"params": list(model.parameters()), "perturb": 1}], TypeError, r"perturb must be a bool"),
    ]:
        optimizer = funcsam.SAMSGD(groups, lr=LR, rho=RHO)
        before = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        with pytest.raises(error, match=message):
            optimizer.first_step(zero_grad=True)
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        optimizer.zero_grad()
