"""Every mode with every gradient source, and every other axis with each mode, against one reference.

The reference below is written from the papers' formulas with plain autograd and torch.optim (no
funcsam code): per-unit gradients at w, per-unit perturbations, the mean gradient at w + e_k, the
mode's direction, clipping, and the base step through ``torch.optim.SGD``/``AdamW`` with ``p.grad``.
The model has a LayerNorm (so SAM-ON has something to perturb) and no BatchNorm (so micro-batches
give exactly the whole batch's gradient). Three steps exercise both branches of every schedule.

The matrix (each cell checked to 1e-5 after three steps):

    modes:   full, every(2), late(1), LookSAM(k=2), MSAM, GSAM(0.5), AESAM(T=4)
    sources: OneBatch, MicroBatches (2 micro-batches), MSharpness(2)            (all 21 pairs)
    axes:    SAM-ON mask, AdamW base, grad_reduce (global, local), fp16 loss scaling,
             max_grad_norm, torch.compile                                       (each with every mode)
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
import torch.nn as nn
import torch.nn.functional as F

import funcsam

RHO, LR, ADAMW_LR, EPS, STEPS, TOTAL = 0.1, 0.1, 0.01, 1e-12, 3, 4
MODES = {
    "full": lambda: None, "every": lambda: funcsam.every(2), "late": lambda: funcsam.late(1),
    "looksam": lambda: funcsam.LookSAM(k=2, alpha=0.7), "msam": lambda: funcsam.MSAM(),
    "gsam": lambda: funcsam.GSAM(0.5), "aesam": lambda: funcsam.AESAM(total_steps=TOTAL),
}
SOURCES = {"batch": (None, 1), "micro-batches": (funcsam.MicroBatches(), 1), "m-sharpness": (funcsam.MSharpness(2), 2)}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def make_batches() -> list:
    generator = torch.Generator().manual_seed(1)
    # The scales differ from batch to batch, so that AE-SAM's ||g||^2 moves and both its branches run.
    return [(torch.randn(8, 6, generator=generator) * scale, torch.randint(0, 3, (8,), generator=generator))
            for scale in (1.0, 3.0, 0.5)]


# ---------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------


def _dot(a, b):
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b)).float()


def _norm(a):
    return _dot(a, a).sqrt()


def reference_run(mode: str, parts: int = 1, *, base: str = "sgd", sam_on: bool = False,
                  max_grad_norm: float | None = None) -> dict:
    model = make_model()
    params = list(model.parameters())
    optimizer = (torch.optim.AdamW(params, lr=ADAMW_LR, weight_decay=0.01) if base == "adamw"
                 else torch.optim.SGD(params, lr=LR, momentum=0.9))
    norm_params = {id(p) for p in model[1].parameters()}
    perturbed = [id(p) in norm_params or not sam_on for p in params]
    g_v = [torch.zeros_like(p) for p in params]
    stats = dict(mean=torch.tensor(0.0), var=torch.tensor(0.0), count=0, take_next=True)

    def grad_at(offsets, x, y):
        with torch.no_grad():
            for p, e in zip(params, offsets):
                p.add_(e)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, e in zip(params, offsets):
                p.sub_(e)
        return list(grads)

    def perturbation(direction):
        kept = [d for d, keep in zip(direction, perturbed) if keep]
        scale = RHO / (_norm(kept) + EPS)
        return [d * scale if keep else torch.zeros_like(d) for d, keep in zip(direction, perturbed)]

    def mean(lists):
        return [torch.stack(group).mean(0) for group in zip(*lists)]

    zero = [torch.zeros_like(p) for p in params]
    for t, (x, y) in enumerate(make_batches()):
        chunks = list(zip(x.chunk(parts), y.chunk(parts)))
        take = {"every": t % 2 == 0, "late": t >= 1, "looksam": t % 2 == 0, "aesam": stats["take_next"]}.get(mode, True)
        if mode == "msam":
            momentum = [optimizer.state[p].get("momentum_buffer", optimizer.state[p].get("exp_avg"))
                        for p in params]
            e = [torch.zeros_like(p) for p in params] if momentum[0] is None else [-v for v in perturbation(momentum)]
            g = mean([grad_at(e, cx, cy) for cx, cy in chunks])
            d = g
        else:
            part_grads = [grad_at(zero, cx, cy) for cx, cy in chunks]
            g = mean(part_grads)
            if take:
                g_sam = mean([grad_at(perturbation(gk), cx, cy) for gk, (cx, cy) in zip(part_grads, chunks)])
                d = g_sam
                if mode == "gsam":
                    g_orth = [a - _dot(g, g_sam) / (_dot(g_sam, g_sam) + EPS) * b for a, b in zip(g, g_sam)]
                    d = [a - 0.5 * b for a, b in zip(g_sam, g_orth)]
                if mode == "looksam":
                    g_v = [a - _dot(g, g_sam) / (_dot(g, g) + EPS) * b for a, b in zip(g_sam, g)]
            else:
                d = g
                if mode == "looksam":
                    d = [a + 0.7 * _norm(g) * v / (_norm(g_v) + EPS) for a, v in zip(g, g_v)]
        if mode == "aesam":
            n = _dot(g, g)
            c = 1.0 + (-1.0 - 1.0) * min(t, TOTAL) / TOTAL
            first = stats["count"] == 0
            stats["mean"] = n if first else 0.9 * stats["mean"] + 0.1 * n
            stats["var"] = torch.tensor(0.0) if first else 0.9 * stats["var"] + 0.1 * (n - stats["mean"]) ** 2
            stats["take_next"] = bool(n >= stats["mean"] + c * stats["var"].sqrt())
            stats["count"] += 1
        if max_grad_norm is not None:
            d = [a * min(1.0, max_grad_norm / (float(_norm(d)) + 1e-6)) for a in d]
        for p, a in zip(params, d):
            p.grad = a.clone()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------
# funcsam
# ---------------------------------------------------------------------------------------------------


class CountingReduce:
    """A one-process ``grad_reduce`` (the mean over one replica is the gradient itself) that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, grads):
        self.calls += 1
        return [g.clone() for g in grads]


def funcsam_run(mode: str, source: str = "batch", *, base: str = "sgd", sam_on: bool = False,
                max_grad_norm: float | None = None, grad_reduce=None, sam_sync: str = "global",
                loss_scale: bool = False, compile_backend=None) -> dict:
    model = make_model()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    the_mode, (the_source, _) = MODES[mode](), SOURCES[source]
    the_base = funcsam.adamw(weight_decay=0.01) if base == "adamw" else funcsam.sgd(momentum=0.9)
    options = funcsam.SAMOptions(max_grad_norm=max_grad_norm, grad_reduce=grad_reduce, sam_sync=sam_sync,
                                 perturb_mask=funcsam.norm_layer_mask(model) if sam_on else None)
    state = funcsam.modes.check_mode(the_mode).init_state(the_base, params)
    scale = funcsam.init_loss_scale(2.0**10) if loss_scale else None
    step = funcsam.sam_step if compile_backend is None else torch.compile(
        funcsam.sam_step, fullgraph=True, backend=compile_backend)
    lr = torch.tensor(ADAMW_LR if base == "adamw" else LR)
    for t, batch in enumerate(make_batches()):
        if source == "micro-batches":
            batch = funcsam.split_batch(batch, 2)
        take = funcsam.modes.check_mode(the_mode).takes_sam(t, state)
        rho = torch.tensor(RHO)  # a new tensor every step: no recompiles
        out = step(params, {}, batch, loss_fn, rho, lr, state, base=the_base, mode=the_mode, take_sam=take,
                   source=the_source, options=options, loss_scale=scale)
        assert bool(out.finite)
        params, state, scale = out.params, out.momentum_state, out.loss_scale
    return params


def assert_same(params, expected, atol=1e-5):
    assert params.keys() == expected.keys()
    for name in params:
        torch.testing.assert_close(params[name], expected[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_with_every_gradient_source_matches_the_reference(mode, source):
    assert_same(funcsam_run(mode, source), reference_run(mode, SOURCES[source][1]))


AXES = {
    "sam-on": (dict(sam_on=True), dict(sam_on=True)),
    "adamw": (dict(base="adamw"), dict(base="adamw")),
    "clipping": (dict(max_grad_norm=0.05), dict(max_grad_norm=0.05)),
    "loss-scale": (dict(loss_scale=True), {}),
    "reduce-global": (dict(sam_sync="global"), {}),
    "reduce-local": (dict(sam_sync="local"), {}),
}


@pytest.mark.parametrize("axis", list(AXES))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_axis_with_every_mode_matches_the_reference(mode, axis):
    ours, theirs = AXES[axis]
    reduce = CountingReduce() if axis.startswith("reduce") else None
    assert_same(funcsam_run(mode, grad_reduce=reduce, **ours), reference_run(mode, **theirs))
    if reduce is not None:
        assert reduce.calls == expected_reductions(mode, local=axis == "reduce-local")


def expected_reductions(mode: str, *, local: bool) -> int:
    """The all-reduces over three steps: a SAM step reduces g and g_sam (under local sync g only where
    the mode uses it), a one-pass step (MSAM's every step) its one gradient."""
    per_sam_step = 2 if (not local or mode in ("looksam", "gsam", "aesam")) else 1
    if mode == "aesam":
        return _aesam_reductions(per_sam_step)
    sam_steps = {"every": 2, "late": 2, "looksam": 2, "msam": 0}.get(mode, STEPS)
    return per_sam_step * sam_steps + (STEPS - sam_steps)


def _aesam_reductions(per_sam_step: int) -> int:
    model = make_model()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss_fn, mode, base = funcsam.make_loss_fn(model, F.cross_entropy), funcsam.AESAM(total_steps=TOTAL), funcsam.sgd(momentum=0.9)
    state, sam_steps = mode.init_state(base, params), 0
    for t, batch in enumerate(make_batches()):
        take = mode.takes_sam(t, state)
        sam_steps += take
        out = funcsam.sam_step(params, {}, batch, loss_fn, RHO, LR, state, base=base, mode=mode, take_sam=take)
        params, state = out.params, out.momentum_state
    assert 0 < sam_steps < STEPS  # both branches ran
    return per_sam_step * sam_steps + (STEPS - sam_steps)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_compiles_one_graph_per_branch_and_matches_the_reference(mode):
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    assert_same(funcsam_run(mode, compile_backend=counter), reference_run(mode))
    branches = {"full": 1, "gsam": 1, "msam": 1}.get(mode, 2)  # the SAM step, and the one-pass step where the mode has one
    assert counter.frame_count == branches, (mode, counter.frame_count)


def test_a_source_that_is_not_one_is_refused_naming_the_choices():
    model = make_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = make_batches()[0]
    with pytest.raises(TypeError, match="MicroBatches"):
        funcsam.sam_step(params, {}, batch, funcsam.make_loss_fn(model, F.cross_entropy), RHO, LR,
                         funcsam.init_momentum(params), source="micro")


def test_a_mode_state_of_another_mode_is_refused_naming_the_state_to_create():
    model = make_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    with pytest.raises(TypeError, match="LookSAMState"):
        funcsam.sam_step(params, {}, make_batches()[0], loss_fn, RHO, LR, funcsam.init_momentum(params),
                         mode=funcsam.LookSAM())
    with pytest.raises(TypeError, match="take_sam must be a Python bool"):
        funcsam.sam_step(params, {}, make_batches()[0], loss_fn, RHO, LR, funcsam.init_momentum(params),
                         take_sam=torch.tensor(True))
