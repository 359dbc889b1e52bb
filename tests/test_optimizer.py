"""SAMSGD as a torch.optim.Optimizer: param groups, checkpoints, schedulers, the closure contract."""

import copy

import pytest
import torch
import torch.nn.functional as F

import funcsam
from helpers import assert_trees_close, bn_convnet, classification_batches, mlp, params_and_buffers


def _closure(optimizer, model, inputs, targets):
    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss
    return closure


def _train(model, optimizer, batches, scheduler=None):
    losses = []
    for inputs, targets in batches:
        losses.append(optimizer.step(_closure(optimizer, model, inputs, targets)))
        if scheduler is not None:
            scheduler.step()
    return losses


def test_drop_in_for_sam_pytorch_signature():
    # sam.pytorch: SAMSGD(params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, rho=0.05)
    model = mlp()
    optimizer = funcsam.SAMSGD(model.parameters(), 0.1, 0.9, 0, 5e-4, True, 0.05)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"], group["rho"]) == (0.1, 0.9, 5e-4, True, 0.05)
    assert funcsam.SAMSGD(model.parameters(), lr=0.1).param_groups[0]["rho"] == 0.05
    inputs, targets = classification_batches(1, 8, (6,))[0]
    loss = optimizer.step(_closure(optimizer, model, inputs, targets))
    torch.testing.assert_close(loss.detach(), F.cross_entropy(mlp()(inputs), targets).detach())


def _groups_reference(model, batch, groups, eps=1e-12):
    """Hand computation of one SAM step with per-group lr/rho and a global gradient norm (no momentum)."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    group_of = {}
    for index, group in enumerate(groups):
        for name in group["names"]:
            group_of[name] = index
    inputs, targets = batch
    g = torch.autograd.grad(F.cross_entropy(model(inputs), targets), params)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    with torch.no_grad():
        e = [groups[group_of[n]]["rho"] * gi / (norm + eps) for n, gi in zip(names, g)]
        for p, ei in zip(params, e):
            p.add_(ei)
    g_sam = torch.autograd.grad(F.cross_entropy(model(inputs), targets), params)
    with torch.no_grad():
        for n, p, ei, gi in zip(names, params, e, g_sam):
            group = groups[group_of[n]]
            p.sub_(ei)
            p.sub_(group["lr"] * (gi + group["weight_decay"] * p))
    return {k: v.detach() for k, v in model.named_parameters()}


def test_param_groups_have_their_own_lr_rho_and_share_the_gradient_norm():
    model = mlp()
    batch = classification_batches(1, 16, (6,))[0]
    groups = [
        dict(names=["0.weight", "0.bias"], lr=0.1, rho=0.05, weight_decay=1e-3),
        dict(names=["2.weight", "2.bias"], lr=0.02, rho=0.5, weight_decay=0.0),
    ]
    expected = _groups_reference(model, batch, groups)
    trained = copy.deepcopy(model)
    named = dict(trained.named_parameters())
    optimizer = funcsam.SAMSGD(
        [{"params": [named[n] for n in g["names"]], **{k: v for k, v in g.items() if k != "names"}} for g in groups],
        lr=0.5,
    )
    optimizer.step(_closure(optimizer, trained, *batch))
    assert_trees_close(params_and_buffers(trained)[0], expected, atol=1e-6)


def test_group_with_rho_zero_is_not_perturbed():
    model = mlp()
    batch = classification_batches(1, 16, (6,))[0]
    groups = [dict(names=["0.weight", "0.bias"], lr=0.1, rho=0.0, weight_decay=0.0),
              dict(names=["2.weight", "2.bias"], lr=0.1, rho=0.2, weight_decay=0.0)]
    expected = _groups_reference(model, batch, groups)
    named = dict(model.named_parameters())
    optimizer = funcsam.SAMSGD([{"params": [named[n] for n in g["names"]], "lr": g["lr"], "rho": g["rho"]}
                                for g in groups], lr=0.1)
    optimizer.step(_closure(optimizer, model, *batch))
    assert_trees_close(params_and_buffers(model)[0], expected, atol=1e-6)


def test_state_dict_round_trip_resumes_exactly():
    model = bn_convnet()
    batches = classification_batches(6, 8, (3, 6, 6))
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=5e-4, rho=0.05)

    straight = copy.deepcopy(model)
    optimizer = funcsam.SAMSGD(straight.parameters(), model=straight, **hyper)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)
    _train(straight, optimizer, batches, scheduler)

    first = copy.deepcopy(model)
    optimizer = funcsam.SAMSGD(first.parameters(), model=first, **hyper)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)
    _train(first, optimizer, batches[:3], scheduler)
    checkpoint = copy.deepcopy({"model": first.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict()})

    resumed = bn_convnet(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    optimizer = funcsam.SAMSGD(resumed.parameters(), model=resumed, **hyper)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)
    scheduler.load_state_dict(checkpoint["scheduler"])
    _train(resumed, optimizer, batches[3:], scheduler)

    assert_trees_close(params_and_buffers(resumed)[0], params_and_buffers(straight)[0], atol=0)
    assert_trees_close(params_and_buffers(resumed)[1], params_and_buffers(straight)[1], atol=0)


def test_loads_a_torch_sgd_state_dict():
    model = mlp()
    batches = classification_batches(4, 8, (6,))
    sgd_model = copy.deepcopy(model)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    for inputs, targets in batches:
        sgd.zero_grad()
        F.cross_entropy(sgd_model(inputs), targets).backward()
        sgd.step()
    reference = copy.deepcopy(sgd_model)
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    reference_opt.load_state_dict(copy.deepcopy(sgd.state_dict()))
    inputs, targets = batches[0]
    reference_opt.zero_grad()
    F.cross_entropy(reference(inputs), targets).backward()
    reference_opt.step()

    optimizer = funcsam.SAMSGD(sgd_model.parameters(), lr=0.1, momentum=0.9, dampening=0.5, rho=0.0)
    optimizer.load_state_dict(copy.deepcopy(sgd.state_dict()))
    optimizer.step(_closure(optimizer, sgd_model, inputs, targets))
    assert_trees_close(params_and_buffers(sgd_model)[0], params_and_buffers(reference)[0], atol=1e-6)


def test_lr_scheduler_changes_the_step():
    model = mlp()
    batch = classification_batches(1, 8, (6,))[0]
    deltas = []
    for gamma in (1.0, 0.1):
        trained = copy.deepcopy(model)
        optimizer = funcsam.SAMSGD(trained.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=gamma)
        _train(trained, optimizer, [batch], scheduler)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * gamma)
        before = params_and_buffers(trained)[0]
        _train(trained, optimizer, [batch])
        after = params_and_buffers(trained)[0]
        deltas.append(torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in after)))
    assert float(deltas[1]) == pytest.approx(0.1 * float(deltas[0]), rel=0.05)


def test_step_without_closure_is_a_type_error():
    optimizer = funcsam.SAMSGD(mlp().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        optimizer.step()


def test_closure_that_drops_gradients_in_the_second_pass_is_refused():
    model = mlp()
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1)
    inputs, targets = classification_batches(1, 8, (6,))[0]
    calls = []

    def closure():
        optimizer.zero_grad(set_to_none=True)
        calls.append(1)
        if len(calls) == 1:
            loss = F.cross_entropy(model(inputs), targets)
        else:
            loss = model[2](torch.randn(8, 8)).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="second"):
        optimizer.step(closure)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(lr=0.1, rho=-0.05), ValueError, "rho"),
    (dict(lr=0.1, momentum=-1.0), ValueError, "momentum"),
    (dict(lr=0.1, weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(lr=0.1, nesterov=True), ValueError, "nesterov"),
    (dict(lr=0.1, eps=0.0), ValueError, "eps"),
    (dict(lr=0.1, max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    (dict(lr=0.1, model="model"), TypeError, "model"),
    (dict(lr="fast"), TypeError, "lr"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        funcsam.SAMSGD(mlp().parameters(), **kwargs)


def test_bad_param_group_is_rejected_and_leaves_the_optimizer_intact():
    model = mlp()
    optimizer = funcsam.SAMSGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        optimizer.add_param_group({"params": model[2].parameters(), "rho": -1.0})
    assert len(optimizer.param_groups) == 1


def test_first_gradients_are_freed_before_the_second_pass():
    """SAMSGD's extra memory is one parameter copy: nothing keeps the first gradients alive."""
    import gc
    import weakref

    model = mlp()
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, rho=0.05, model=model)
    inputs, targets = classification_batches(1, 8, (6,))[0]
    first_grads = []

    def closure():
        optimizer.zero_grad(set_to_none=True)
        if first_grads:
            gc.collect()
            assert all(ref() is None for ref in first_grads), "a first-pass gradient outlived zero_grad"
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        if not first_grads:
            first_grads.extend(weakref.ref(p.grad) for p in model.parameters())
        return loss

    optimizer.step(closure)
    assert bool(optimizer.last_step_finite)
