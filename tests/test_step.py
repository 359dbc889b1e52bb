"""sam_step against the formula written out by hand, against SAMSGD, and its contract."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import funcsam
from helpers import (
    assert_trees_close, assert_trees_equal, bn_convnet, cartesian, classification_batches, mlp, params_and_buffers,
    reference_sam_sgd, run_sam_step, run_samsgd,
)


@cartesian(momentum=[0.0, 0.9], nesterov=[False, True], adaptive=[False, True])
def test_sam_step_matches_hand_written_reference(momentum, nesterov, adaptive):
    if nesterov and not momentum:
        return
    model = mlp()
    batches = classification_batches(5, 16, (6,))
    hyper = dict(momentum=momentum, weight_decay=5e-4, nesterov=nesterov, adaptive=adaptive,
                 eta=0.01 if adaptive else 0.0)
    rho = 0.5 if adaptive else 0.05
    expected = reference_sam_sgd(model, batches, rho=rho, lr=0.1, **hyper)
    params, _ = run_sam_step(model, batches, rho, 0.1, **hyper)
    assert_trees_close(params, expected, atol=1e-6)


def test_samsgd_matches_hand_written_reference_with_dampening():
    model = mlp()
    batches = classification_batches(5, 16, (6,))
    hyper = dict(momentum=0.9, dampening=0.2, weight_decay=1e-3)
    expected = reference_sam_sgd(model, batches, rho=0.1, lr=0.1, **hyper)
    params, _ = run_samsgd(model, batches, lr=0.1, rho=0.1, **hyper)
    assert_trees_close(params, expected, atol=1e-6)


@pytest.mark.parametrize("make_model,shape", [(mlp, (6,)), (bn_convnet, (3, 6, 6))], ids=["mlp", "bn_convnet"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_equals_samsgd_over_five_steps(make_model, shape, adaptive):
    model = make_model()
    batches = classification_batches(5, 8, shape)
    hyper = dict(momentum=0.9, weight_decay=5e-4, nesterov=True, adaptive=adaptive)
    params, buffers = run_sam_step(model, batches, 0.05, 0.1, **hyper)
    expected_params, expected_buffers = run_samsgd(model, batches, lr=0.1, rho=0.05, **hyper)
    assert_trees_close(params, expected_params, atol=1e-5)
    assert_trees_close(buffers, expected_buffers, atol=1e-5)


def _first_pass_statistics(model, batch):
    """Running stats after one training-mode forward at the unperturbed weights."""
    model = copy.deepcopy(model)
    model.train()
    with torch.no_grad():
        model(batch[0])
    return {k: v.detach() for k, v in model.named_buffers()}


def test_batchnorm_statistics_come_from_the_first_pass_only():
    model = bn_convnet()
    batch = classification_batches(1, 8, (3, 6, 6))[0]
    expected = _first_pass_statistics(model, batch)
    _, buffers = run_sam_step(model, [batch], 0.5, 0.1)
    assert_trees_close(buffers, expected, atol=1e-6)
    assert int(buffers["1.num_batches_tracked"]) == 1
    _, adapter_buffers = run_samsgd(model, [batch], lr=0.1, rho=0.5)
    assert_trees_close(adapter_buffers, expected, atol=1e-6)
    # Without model=, SAMSGD lets the perturbed pass update them too (sam.pytorch's behaviour).
    _, both_passes = run_samsgd(model, [batch], keep_first_pass_bn=False, lr=0.1, rho=0.5)
    assert int(both_passes["1.num_batches_tracked"]) == 2


def test_sam_step_mutates_nothing_it_was_given():
    model = bn_convnet()
    params, buffers = params_and_buffers(model)
    state = funcsam.init_momentum(params)
    state = state._replace(momentum_buffer={k: torch.randn_like(v) for k, v in params.items()})
    snapshot = copy.deepcopy((params, buffers, state))
    batch = classification_batches(1, 8, (3, 6, 6))[0]
    batch_copy = copy.deepcopy(batch)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    out = funcsam.sam_step(params, buffers, batch, loss_fn, 0.05, 0.1, state, momentum=0.9, weight_decay=1e-3)
    assert_trees_close(params, snapshot[0], atol=0)
    assert_trees_close(buffers, snapshot[1], atol=0)
    assert_trees_close(state.momentum_buffer, snapshot[2].momentum_buffer, atol=0)
    assert int(state.count) == 0 and int(out.momentum_state.count) == 1
    torch.testing.assert_close(batch, batch_copy, rtol=0, atol=0)
    assert not torch.equal(out.params["0.weight"], params["0.weight"])
    # The module's own tensors are never touched either.
    assert_trees_close(params_and_buffers(model)[0], params, atol=0)


@pytest.mark.parametrize("mode", [None, funcsam.GSAM(alpha=0.2)], ids=["sam", "gsam reads g"])
def test_second_pass_holds_neither_g_nor_a_separate_e(mode):
    """SAM's extra memory is w + e: the first gradient is gone when the second pass runs (unless the mode
    reads it, as GSAM does), and w + e is written into e's own tensors."""
    import gc
    import weakref

    class Watched(funcsam.OneBatch):
        def first_pass(self, gradient, point, buffers, batch):
            first = super().first_pass(gradient, point, buffers, batch)
            self.__dict__["g"] = [weakref.ref(grad) for grad in first.units[0]]
            return first

        def second_pass(self, gradient, leaves, perturbations, buffers, batch):
            gc.collect()
            self.__dict__["g_alive"] = sum(ref() is not None for ref in self.__dict__["g"])
            e_ids = [id(e) for e in perturbations[0]]
            grads = super().second_pass(gradient, leaves, perturbations, buffers, batch)
            self.__dict__["in_place"] = [id(x) for x in perturbations[0]] == e_ids
            return grads

    model = mlp()
    params, buffers = params_and_buffers(model)
    batch = classification_batches(1, 8, (6,))[0]
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    source = Watched()
    base = funcsam.sgd(momentum=0.9)
    mode_ = funcsam.FullSAM() if mode is None else mode
    out = funcsam.sam_step(params, buffers, batch, loss_fn, 0.05, 0.1, mode_.init_state(base, params), base=base,
                           mode=mode, source=source)
    assert source.g_alive == (0 if mode is None else len(params))
    assert source.in_place
    expected = reference_sam_sgd(model, [batch], rho=0.05, lr=0.1, momentum=0.9) if mode is None else None
    if expected is not None:
        assert_trees_close(out.params, expected, atol=1e-6)


def test_second_pass_point_keeps_the_weights_layout_when_computed_in_channels_last():
    """Weights stored contiguous, computed in channels_last: g and e come out channels_last, and the
    second pass gets w + e in the weights' own strides (as the first pass had them), each e freed."""
    import gc
    import weakref

    seen = {}

    class Watched(funcsam.OneBatch):
        def second_pass(self, gradient, leaves, perturbations, buffers, batch):
            e_refs = [weakref.ref(e) for e in perturbations[0]]
            seen["e_strides_differ"] = any(e.stride() != w.stride() for e, w in zip(perturbations[0], leaves))

            def watched_gradient(point, buffers, batch):
                gc.collect()
                seen["strides"] = [p.stride() == w.stride() for p, w in zip(point, leaves)]
                seen["stale_e"] = sum(ref() is not None and all(ref() is not p for p in point) for ref in e_refs)
                return gradient(point, buffers, batch)

            return super().second_pass(watched_gradient, leaves, perturbations, buffers, batch)

    model = bn_convnet()
    params, buffers = params_and_buffers(model)
    batch = classification_batches(1, 8, (3, 6, 6))[0]
    state = funcsam.init_momentum(params)
    outs = [funcsam.sam_step(params, buffers, batch, funcsam.make_loss_fn(model, F.cross_entropy, memory_format=layout),
                             0.05, 0.1, state, momentum=0.9, source=source)
            for layout, source in ((torch.channels_last, Watched()), (None, None))]
    assert seen["e_strides_differ"] and all(seen["strides"]) and seen["stale_e"] == 0
    assert_trees_close(outs[0].params, outs[1].params, atol=1e-5)


def test_output_fields():
    model = mlp()
    params, buffers = params_and_buffers(model)
    batch = classification_batches(1, 8, (6,))[0]
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    out = funcsam.sam_step(params, buffers, batch, loss_fn, 0.05, 0.1, funcsam.init_momentum(params))
    torch.testing.assert_close(out.loss, F.cross_entropy(model(batch[0]), batch[1]).detach())
    torch.testing.assert_close(out.aux, model(batch[0]).detach())
    g = torch.autograd.grad(F.cross_entropy(model(batch[0]), batch[1]), list(model.parameters()))
    torch.testing.assert_close(out.grad_norm, torch.sqrt(sum((x ** 2).sum() for x in g)))
    assert out.finite.dtype == torch.bool and bool(out.finite)
    assert out.loss_scale is None


def test_zero_gradient_gives_zero_perturbation_not_nan():
    model = mlp()
    params, buffers = params_and_buffers(model)
    batch = classification_batches(1, 8, (6,))[0]

    def flat_loss(params, buffers, batch):
        return (params["0.weight"] * 0.0).sum(), (buffers, None)

    out = funcsam.sam_step(params, buffers, batch, flat_loss, 0.05, 0.1, funcsam.init_momentum(params), momentum=0.9)
    assert bool(out.finite)
    assert float(out.grad_norm) == 0.0
    assert_trees_close(out.params, params, atol=0)
    e, norm = funcsam.perturbation_and_norm([torch.zeros(3)], [torch.ones(3)], 0.05)
    assert torch.equal(e[0], torch.zeros(3)) and float(norm) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_skips_the_step(bad):
    model = bn_convnet()
    params, buffers = params_and_buffers(model)
    state = funcsam.init_momentum(params)
    batch = classification_batches(1, 8, (3, 6, 6))[0]
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)

    def poisoned(params, buffers, batch):
        loss, aux = loss_fn(params, buffers, batch)
        return loss * bad, aux

    out = funcsam.sam_step(params, buffers, batch, poisoned, 0.05, 0.1, state, momentum=0.9)
    assert not bool(out.finite)
    assert_trees_close(out.params, params, atol=0)
    assert_trees_close(out.buffers, buffers, atol=0)
    assert_trees_close(out.momentum_state.momentum_buffer, state.momentum_buffer, atol=0)
    assert int(out.momentum_state.count) == 0


def test_non_finite_second_pass_skips_the_step():
    model = mlp()
    params, buffers = params_and_buffers(model)
    batch = classification_batches(1, 8, (6,))[0]
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    calls = []

    def nan_on_second_call(params, buffers, batch):
        calls.append(1)
        loss, aux = loss_fn(params, buffers, batch)
        return (loss if len(calls) == 1 else loss * float("nan")), aux

    out = funcsam.sam_step(params, buffers, batch, nan_on_second_call, 0.05, 0.1, funcsam.init_momentum(params))
    assert not bool(out.finite) and bool(torch.isfinite(out.grad_norm))
    assert_trees_close(out.params, params, atol=0)


def test_samsgd_skips_non_finite_step():
    model = mlp()
    before = params_and_buffers(model)[0]
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs, targets = classification_batches(1, 8, (6,))[0]

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets) * float("nan")
        loss.backward()
        return loss

    optimizer.step(closure)
    assert not bool(optimizer.last_step_finite)
    assert_trees_close(params_and_buffers(model)[0], before, atol=0)
    assert all(int(s["step"]) == 0 for s in optimizer.state.values())


def test_clipping_applies_to_the_sam_gradient():
    model = mlp()
    batches = classification_batches(1, 16, (6,))
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state = funcsam.init_momentum(params)
    lr = 1.0
    out = funcsam.sam_step(params, buffers, batches[0], loss_fn, 0.05, lr, state, max_grad_norm=1e-3)
    step_norm = torch.sqrt(sum(((out.params[k] - params[k]) ** 2).sum() for k in params))
    torch.testing.assert_close(step_norm, torch.tensor(1e-3), rtol=1e-4, atol=0)
    adapter_params, _ = run_samsgd(model, batches, lr=lr, rho=0.05, max_grad_norm=1e-3)
    assert_trees_close(out.params, adapter_params, atol=1e-7)


def _call(**overrides):
    model = mlp()
    params, buffers = params_and_buffers(model)
    args = dict(params=params, buffers=buffers, batch=classification_batches(1, 4, (6,))[0],
                loss_fn=funcsam.make_loss_fn(model, F.cross_entropy), rho=0.05, lr=0.1,
                momentum_state=funcsam.init_momentum(params))
    args.update(overrides)
    return funcsam.sam_step(**args)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(rho=-0.1), ValueError, "rho"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(lr=torch.tensor(-1.0)), ValueError, "lr"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "lr must be a 0-dim"),
    (dict(rho=float("nan")), ValueError, "rho"),
    (dict(rho="0.05"), TypeError, "rho"),
    (dict(momentum=-0.9), ValueError, "momentum"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
    (dict(dampening=-0.1), ValueError, "dampening"),
    (dict(nesterov=True), ValueError, "nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "nesterov"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    (dict(loss_fn=None), TypeError, "loss_fn"),
    (dict(momentum_state={"a": 1}), TypeError, "init_momentum"),
    (dict(momentum_state=funcsam.init_momentum({"w": torch.zeros(2)})), ValueError, "structure"),
    (dict(params={}), ValueError, "params is empty"),
    (dict(sam_sync="sometimes"), ValueError, "sam_sync"),
])
def test_bad_input_is_rejected_with_a_message_naming_it(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_make_loss_fn_rejects_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        funcsam.make_loss_fn(lambda x: x, F.cross_entropy)
    with pytest.raises(TypeError, match="criterion"):
        funcsam.make_loss_fn(mlp(), "cross_entropy")
    for bad in (torch.preserve_format, torch.contiguous_format, "channels_last", "Auto", [4]):
        with pytest.raises(ValueError, match='memory_format must be "auto", None, torch.channels_last'):
            funcsam.make_loss_fn(mlp(), F.cross_entropy, memory_format=bad)


def test_loss_fn_computing_in_channels_last_gives_the_same_sam_steps():
    """memory_format changes the layout the forward computes in, never the numbers: SAM steps over
    contiguous storage equal the plain loss function's (to float32 rounding of a different conv
    algorithm), the stored params keep their layout, and the 4-D inputs reach the model as NHWC."""
    model = bn_convnet()
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    batches = classification_batches(3, 8, (3, 6, 6))
    results = {}
    for memory_format in (None, torch.channels_last):
        params, buffers = params_and_buffers(model)
        stored = {k: v.clone() for k, v in params.items()}
        loss_fn = funcsam.make_loss_fn(model, F.cross_entropy, memory_format=memory_format)
        state = funcsam.init_momentum(params)
        for batch in batches:
            out = funcsam.sam_step(params, buffers, batch, loss_fn, 0.05, 0.1, state, momentum=0.9,
                                   weight_decay=5e-4)
            assert_trees_equal(params, stored)  # the step is pure: its inputs are never written
            params, buffers, state = out.params, out.buffers, out.momentum_state
            stored = {k: v.clone() for k, v in params.items()}
        assert all(p.is_contiguous() for p in params.values())
        results[memory_format] = (params, buffers, out.loss)
    assert seen == [False] * 6 + [True] * 6  # two passes per step, three steps each
    (p0, b0, l0), (p1, b1, l1) = results[None], results[torch.channels_last]
    assert_trees_close(p0, p1, atol=1e-5)
    assert_trees_close(b0, b1, atol=1e-5)
    torch.testing.assert_close(l0, l1)


def _layouts_the_compiled_forward_converts_to(loss_fn, params, buffers, batch) -> set:
    """The memory formats the graph dynamo captures of ``loss_fn`` converts tensors to."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(loss_fn, backend=capture, fullgraph=True)(params, buffers, batch)
    to_last = {(0, 2, 3, 1): torch.channels_last, (0, 2, 3, 4, 1): torch.channels_last_3d}
    dims = [tuple(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
            else tuple(node.args[1:]) for gm in graphs for node in gm.graph.nodes if node.target == "permute"]
    return {to_last[d] for d in dims if d in to_last}


@pytest.mark.parametrize("model, batch_shape, memory_format, converts", [
    (bn_convnet, (3, 6, 6), "auto", {torch.channels_last}),
    (bn_convnet, (3, 6, 6), None, set()),
    (lambda: nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4 * 4, 2)), (2, 4, 4, 4),
     "auto", {torch.channels_last_3d}),
    (mlp, (6,), "auto", set()),
], ids=["conv2d-auto", "conv2d-opt-out", "conv3d-auto", "mlp-auto"])
def test_auto_memory_format_computes_compiled_convolutions_in_channels_last(model, batch_shape, memory_format,
                                                                           converts):
    """"auto" (the default) does for a compiled loss function what inductor's layout optimisation does
    for torch.compile(model): a model with convolutions computes in channels_last (3-D: channels_last_3d);
    None opts out; a model without convolutions is left alone. Eager calls compute as stored."""
    module = model()
    params, buffers = params_and_buffers(module)
    batch = classification_batches(1, 4, batch_shape, classes=2)[0]
    loss_fn = funcsam.make_loss_fn(module, F.cross_entropy, memory_format=memory_format)
    assert _layouts_the_compiled_forward_converts_to(loss_fn, params, buffers, batch) == converts
    seen = []
    first = next(m for m in module.modules() if not list(m.children()))
    first.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    loss_fn(params, buffers, batch)
    assert seen == [True]  # eager: the stored (contiguous) layout, no copy


def test_loss_fn_in_channels_last_3d_converts_5d_tensors_only():
    model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4 * 4, 2))
    params, buffers = params_and_buffers(model)
    inputs, targets = torch.randn(5, 2, 4, 4, 4), torch.randint(0, 2, (5,))
    grads = {}
    for memory_format in (None, torch.channels_last_3d):
        loss_fn = funcsam.make_loss_fn(model, F.cross_entropy, memory_format=memory_format)
        grads[memory_format] = torch.func.grad(lambda p: loss_fn(p, buffers, (inputs, targets))[0])(params)
    assert_trees_close(grads[None], grads[torch.channels_last_3d], atol=1e-6)


@pytest.mark.parametrize("unused_parameter", [False, True])
def test_eager_autograd_path_equals_the_torch_func_grad_path(monkeypatch, unused_parameter):
    """Outside compile/vmap the gradient is taken by plain autograd: it must be torch.func.grad's."""
    import funcsam.engine

    model = bn_convnet()
    if unused_parameter:
        model.register_parameter("unused", torch.nn.Parameter(torch.randn(2)))
    batches = classification_batches(3, 8, (3, 6, 6))
    hyper = dict(momentum=0.9, weight_decay=5e-4)
    fast = run_sam_step(model, batches, 0.05, 0.1, **hyper)
    monkeypatch.setattr(funcsam.engine, "traced_or_transformed", lambda: True)
    transformed = run_sam_step(model, batches, 0.05, 0.1, **hyper)
    assert_trees_close(fast[0], transformed[0], atol=1e-6)
    assert_trees_close(fast[1], transformed[1], atol=1e-6)
    if unused_parameter:
        # No gradient reaches it, so only weight decay moves it; both paths agree on that.
        assert_trees_close({"w": fast[0]["unused"]}, {"w": transformed[0]["unused"]}, atol=0)
