"""The sharpness meter against independent computations.

Quadratics 0.5 x^T A x with a known spectrum (H = A exactly), a tiny MLP against the full Hessian from
``torch.autograd.functional.hessian`` (double backward, no jvp), and a BatchNorm convnet against a
central finite difference of ``torch.autograd.grad`` gradients.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import funcsam
import helpers
from funcsam.sharpness import HessianEigenvalue, HessianTrace, hessian_trace, top_hessian_eigenvalue

SHAPES = {"a": (2, 3), "b": (4,)}  # a dict of two leaves, 10 coordinates in all


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny: extra intra-op threads only contend (4x slower on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _concat(tree):
    """The leaves of a {"a", "b"} dict as one vector, in an order fixed here (not optree's)."""
    return torch.cat([tree["a"].reshape(-1), tree["b"].reshape(-1)])


def _quadratic(eigenvalues, seed=0):
    """``(loss_fn, params, A, Q)``: loss = 0.5 x^T A x with A = Q diag(eigenvalues) Q^T, fp64."""
    g = torch.Generator().manual_seed(seed)
    eigenvalues = torch.tensor(eigenvalues, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    a = q @ torch.diag(eigenvalues) @ q.T
    params = {k: torch.randn(shape, generator=g, dtype=torch.float64) for k, shape in SHAPES.items()}

    def loss_fn(params, buffers, batch):
        x = _concat(params)
        return 0.5 * x @ a @ x, (buffers, ())

    return loss_fn, params, a, q


def _cos(u, v):
    return float(u @ v / (u.norm() * v.norm()))


# ---------------------------------------------------------------------------- analytic quadratics

SPECTRUM = [9.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05]


def test_top_eigenvalue_and_vector_of_a_quadratic():
    loss_fn, params, a, q = _quadratic(SPECTRUM)
    out = top_hessian_eigenvalue(loss_fn, params, {}, None, iters=200, tol=1e-10)
    assert isinstance(out, HessianEigenvalue) and out.converged and out.iterations < 200
    assert out.value.dim() == 0 and out.value.dtype == torch.float64
    assert float(out.value) == pytest.approx(9.0, rel=1e-4)
    vector = _concat(out.vector)
    assert float(vector.norm()) == pytest.approx(1.0, abs=1e-12)
    assert abs(_cos(vector, q[:, 0])) > 0.999
    assert {k: v.shape for k, v in out.vector.items()} == {k: torch.Size(s) for k, s in SHAPES.items()}


def test_power_iteration_finds_the_largest_magnitude_even_if_negative():
    loss_fn, params, _, q = _quadratic([-9.0] + SPECTRUM[1:])
    out = top_hessian_eigenvalue(loss_fn, params, {}, None, iters=200, tol=1e-10)
    assert out.converged
    assert float(out.value) == pytest.approx(-9.0, rel=1e-4)
    assert abs(_cos(_concat(out.vector), q[:, 0])) > 0.999


def test_stops_where_a_reference_power_iteration_meets_tol():
    loss_fn, params, a, _ = _quadratic(SPECTRUM)
    tol = 1e-4
    out = top_hessian_eigenvalue(loss_fn, params, {}, None, iters=100, tol=tol, seed=3)
    # The start vector is the one returned after a single iteration (no step is taken after the last).
    v = _concat(top_hessian_eigenvalue(loss_fn, params, {}, None, iters=1, seed=3).vector)
    quotients = []
    for k in range(1, 101):
        quotients.append(float(v @ a @ v))
        if k > 1 and abs(quotients[-1] - quotients[-2]) < tol * abs(quotients[-1]):
            break
        v = a @ v / (a @ v).norm()
    assert out.converged and out.iterations == len(quotients)
    assert float(out.value) == pytest.approx(quotients[-1], rel=1e-12)
    assert torch.allclose(_concat(out.vector), v, atol=1e-12)


def test_runs_out_of_iters_without_converging():
    loss_fn, params, _, _ = _quadratic(SPECTRUM)
    out = top_hessian_eigenvalue(loss_fn, params, {}, None, iters=2, tol=1e-12)
    assert out.iterations == 2 and out.converged is False


def test_zero_hessian_gives_zero_and_stops():
    def linear(params, buffers, batch):
        return params["a"].sum() + 2 * params["b"].sum(), (buffers, ())

    params = {k: torch.ones(shape, dtype=torch.float64) for k, shape in SHAPES.items()}
    out = top_hessian_eigenvalue(linear, params, {}, None)
    assert float(out.value) == 0.0 and out.converged and out.iterations == 1
    trace = hessian_trace(linear, params, {}, None, samples=3)
    assert float(trace.value) == 0.0 and float(trace.stderr) == 0.0


def test_non_finite_hessian_vector_product_stops_unconverged():
    def nan_loss(params, buffers, batch):
        return (_concat(params) ** 2).sum() * float("nan"), (buffers, ())

    params = {k: torch.ones(shape, dtype=torch.float64) for k, shape in SHAPES.items()}
    out = top_hessian_eigenvalue(nan_loss, params, {}, None)
    assert out.iterations == 1 and out.converged is False and math.isnan(float(out.value))


def test_trace_of_a_diagonal_quadratic_is_exact():
    # v^T D v = sum_j D_jj v_j^2 = tr(D) for every sign vector v: no noise, only the mean's rounding.
    g = torch.Generator().manual_seed(0)
    diagonal = {k: 1 + 4 * torch.rand(shape, generator=g, dtype=torch.float64) for k, shape in SHAPES.items()}

    def loss_fn(params, buffers, batch):
        return 0.5 * sum((diagonal[k] * params[k] ** 2).sum() for k in params), (buffers, ())

    params = {k: torch.randn(shape, generator=g, dtype=torch.float64) for k, shape in SHAPES.items()}
    out = hessian_trace(loss_fn, params, {}, None, samples=7)
    assert isinstance(out, HessianTrace)
    assert float(out.value) == pytest.approx(float(_concat(diagonal).sum()), rel=1e-14)
    assert float(out.stderr) < 1e-14 * float(out.value)


def test_trace_of_a_dense_quadratic_and_its_standard_error():
    loss_fn, params, a, _ = _quadratic(SPECTRUM)
    out = hessian_trace(loss_fn, params, {}, None, samples=200)
    assert abs(float(out.value) - sum(SPECTRUM)) < 4 * float(out.stderr)
    # Var(v^T A v) = 2 sum_{j != k} A_jk^2 for Rademacher v.
    off_diagonal = a - torch.diag(torch.diag(a))
    expected_stderr = math.sqrt(2 * float((off_diagonal**2).sum()) / 200)
    assert float(out.stderr) == pytest.approx(expected_stderr, rel=0.3)


def test_one_sample_has_no_standard_error():
    loss_fn, params, _, _ = _quadratic(SPECTRUM)
    out = hessian_trace(loss_fn, params, {}, None, samples=1)
    assert math.isfinite(float(out.value)) and math.isnan(float(out.stderr))


def test_seeds_are_deterministic_and_leave_the_global_rng_alone():
    loss_fn, params, _, _ = _quadratic(SPECTRUM)
    rng = torch.get_rng_state()
    first = top_hessian_eigenvalue(loss_fn, params, {}, None, iters=3, seed=5)
    again = top_hessian_eigenvalue(loss_fn, params, {}, None, iters=3, seed=5)
    other = top_hessian_eigenvalue(loss_fn, params, {}, None, iters=3, seed=6)
    assert torch.equal(first.value, again.value) and torch.equal(first.vector["a"], again.vector["a"])
    assert not torch.equal(first.vector["a"], other.vector["a"])
    traces = [hessian_trace(loss_fn, params, {}, None, samples=5, seed=s) for s in (5, 5, 6)]
    assert torch.equal(traces[0].value, traces[1].value) and not torch.equal(traces[0].value, traces[2].value)
    assert torch.equal(torch.get_rng_state(), rng)


def test_fp32_params_give_fp32_results():
    loss_fn, params, _, _ = _quadratic(SPECTRUM)
    a32 = {k: v.float() for k, v in params.items()}
    matrix = torch.eye(10)

    def loss32(params, buffers, batch):
        x = _concat(params)
        return 0.5 * x @ (3 * matrix) @ x, (buffers, ())

    out = top_hessian_eigenvalue(loss32, a32, {}, None)
    assert out.value.dtype == torch.float32 and all(v.dtype == torch.float32 for v in out.vector.values())
    assert float(out.value) == pytest.approx(3.0, rel=1e-6)
    assert hessian_trace(loss32, a32, {}, None, samples=2).value.dtype == torch.float32


# ---------------------------------------------------------------------------- a tiny MLP, full Hessian


@pytest.fixture(scope="module")
def mlp_problem():
    """``(loss_fn, params, batch, H)`` with H the exact fp64 Hessian over the flattened params."""
    model = helpers.mlp(seed=0, d_in=4, hidden=6, d_out=3).double()
    params, buffers = helpers.params_and_buffers(model)
    inputs, targets = helpers.classification_batches(1, 16, (4,))[0]
    batch = (inputs.double(), targets)
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def flat_loss(theta):
        pieces = dict(zip(names, (p.reshape(s) for p, s in zip(theta.split(sizes), shapes))))
        return F.cross_entropy(functional_call(model, pieces, (batch[0],)), batch[1])

    theta = torch.cat([params[k].reshape(-1) for k in names])
    hessian = torch.autograd.functional.hessian(flat_loss, theta)
    flat = lambda tree: torch.cat([tree[k].reshape(-1) for k in names])  # noqa: E731
    return funcsam.make_loss_fn(model, F.cross_entropy), params, batch, hessian, flat


def test_mlp_top_eigenvalue_matches_the_full_hessian(mlp_problem):
    loss_fn, params, batch, hessian, flat = mlp_problem
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
    top = int(eigenvalues.abs().argmax())
    out = top_hessian_eigenvalue(loss_fn, params, {}, batch, iters=1000, tol=1e-13)
    assert out.converged
    assert float(out.value) == pytest.approx(float(eigenvalues[top]), rel=1e-5)
    assert abs(_cos(flat(out.vector), eigenvectors[:, top])) > 0.999


def test_mlp_trace_matches_the_full_hessian(mlp_problem):
    loss_fn, params, batch, hessian, _ = mlp_problem
    exact = float(torch.trace(hessian))
    few = hessian_trace(loss_fn, params, {}, batch, samples=25)
    many = hessian_trace(loss_fn, params, {}, batch, samples=400, seed=1)
    assert abs(float(few.value) - exact) < 4 * float(few.stderr)
    assert abs(float(many.value) - exact) < 4 * float(many.stderr)
    # Var(v^T H v) = 2 sum_{j != k} H_jk^2 for Rademacher v.
    off_diagonal = hessian - torch.diag(torch.diag(hessian))
    expected_stderr = math.sqrt(2 * float((off_diagonal**2).sum()) / 400)
    assert float(many.stderr) == pytest.approx(expected_stderr, rel=0.3)
    assert float(many.value) == pytest.approx(exact, rel=0.25)


# ---------------------------------------------------------------------------- BatchNorm via make_loss_fn


def _bn_problem():
    model = helpers.bn_convnet(seed=0).double()
    model.train()
    params, buffers = helpers.params_and_buffers(model)
    inputs, targets = helpers.classification_batches(1, 8, (3, 6, 6))[0]
    return model, params, buffers, (inputs.double(), targets)


def test_batchnorm_convnet_is_pure_and_deterministic():
    model, params, buffers, batch = _bn_problem()
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    params_before = {k: v.clone() for k, v in params.items()}
    buffers_before = {k: v.clone() for k, v in buffers.items()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    first = top_hessian_eigenvalue(loss_fn, params, buffers, batch, iters=5, seed=2)
    again = top_hessian_eigenvalue(loss_fn, params, buffers, batch, iters=5, seed=2)
    trace = hessian_trace(loss_fn, params, buffers, batch, samples=4, seed=2)
    trace_again = hessian_trace(loss_fn, params, buffers, batch, samples=4, seed=2)

    assert math.isfinite(float(first.value)) and math.isfinite(float(trace.value))
    assert torch.equal(first.value, again.value)
    assert all(torch.equal(first.vector[k], again.vector[k]) for k in params)
    assert torch.equal(trace.value, trace_again.value) and torch.equal(trace.stderr, trace_again.stderr)
    for before, after in ((params_before, params), (buffers_before, buffers), (state_before, model.state_dict())):
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_batchnorm_train_mode_quotient_matches_finite_differences():
    # The meter differentiates through the batch statistics: check v . Hv against a central
    # difference of autograd gradients of the same train-mode model.
    model, params, buffers, batch = _bn_problem()
    out = top_hessian_eigenvalue(funcsam.make_loss_fn(model, F.cross_entropy), params, buffers, batch, iters=3)

    def gradient(shift):
        shifted = {k: (params[k] + shift * out.vector[k]).requires_grad_() for k in params}
        fresh = {k: v.clone() for k, v in buffers.items()}
        loss = F.cross_entropy(functional_call(model, (shifted, fresh), (batch[0],)), batch[1])
        return dict(zip(shifted, torch.autograd.grad(loss, list(shifted.values()))))

    eps = 1e-5
    plus, minus = gradient(eps), gradient(-eps)
    quotient = sum(float((out.vector[k] * (plus[k] - minus[k])).sum()) for k in params) / (2 * eps)
    assert float(out.value) == pytest.approx(quotient, rel=1e-5)


def test_accepts_parameters_that_require_grad_and_records_no_graph():
    model = helpers.mlp(seed=1).double()
    params = dict(model.named_parameters())
    batch = tuple(t.double() if t.is_floating_point() else t for t in helpers.classification_batches(1, 8, (6,))[0])
    out = top_hessian_eigenvalue(funcsam.make_loss_fn(model, F.cross_entropy), params, {}, batch, iters=3)
    trace = hessian_trace(funcsam.make_loss_fn(model, F.cross_entropy), params, {}, batch, samples=2)
    assert not out.value.requires_grad and not trace.value.requires_grad
    assert not any(v.requires_grad for v in out.vector.values())
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------- bad inputs


def _setting_id(value):
    return ",".join(f"{k}={v!r}" for k, v in value.items()) if isinstance(value, dict) else "-"


def _good_quadratic():
    loss_fn, params, _, _ = _quadratic(SPECTRUM)
    return loss_fn, params


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"iters": 0}, ValueError, "iters must be >= 1"),
        ({"iters": 2.5}, TypeError, "iters must be an int"),
        ({"iters": True}, TypeError, "iters must be an int"),
        ({"tol": 0.0}, ValueError, "tol must be > 0"),
        ({"tol": -1e-3}, ValueError, "tol must be > 0"),
        ({"tol": float("nan")}, ValueError, "tol must be > 0"),
        ({"tol": "1e-3"}, TypeError, "tol must be a real number"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"seed": None}, TypeError, "seed must be an int"),
    ],
    ids=_setting_id,
)
def test_top_eigenvalue_rejects_bad_settings(kwargs, error, message):
    loss_fn, params = _good_quadratic()
    with pytest.raises(error, match=message):
        top_hessian_eigenvalue(loss_fn, params, {}, None, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"samples": 0}, ValueError, "samples must be >= 1"),
        ({"samples": 10.0}, TypeError, "samples must be an int"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
    ],
    ids=_setting_id,
)
def test_trace_rejects_bad_settings(kwargs, error, message):
    loss_fn, params = _good_quadratic()
    with pytest.raises(error, match=message):
        hessian_trace(loss_fn, params, {}, None, **kwargs)


def _bare_loss(params, buffers, batch):
    return _concat(params).pow(2).sum()


def _unreduced_loss(params, buffers, batch):
    return _concat(params).pow(2), (buffers, ())


def _int_loss(params, buffers, batch):
    return 3, (buffers, ())


BAD_CALLS = {
    "params-empty": (dict(params={}), ValueError, "params is empty"),
    "params-int-tensor": (dict(params={"a": torch.zeros(3, dtype=torch.int64)}), TypeError, "floating-point tensor"),
    "params-float-leaf": (dict(params={"a": 1.0}), TypeError, "floating-point tensor"),
    "loss_fn-not-callable": (dict(loss_fn=None), TypeError, "loss_fn must be callable"),
    "loss_fn-returns-bare-loss": (dict(loss_fn=_bare_loss), TypeError, r"must return \(loss, \(new_buffers, aux\)\)"),
    "loss-not-0-dim": (dict(loss_fn=_unreduced_loss), TypeError, r"0-dim floating-point loss tensor .*shape \(10,\)"),
    "loss-not-a-tensor": (dict(loss_fn=_int_loss), TypeError, "0-dim floating-point loss tensor first, got int"),
}


@pytest.mark.parametrize("meter", [top_hessian_eigenvalue, hessian_trace], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_rejects_bad_params_and_loss_fn(meter, case):
    overrides, error, message = case
    loss_fn, params = _good_quadratic()
    arguments = {"loss_fn": loss_fn, "params": params, **overrides}
    with pytest.raises(error, match=message):
        meter(arguments["loss_fn"], arguments["params"], {}, None)
    # A failure inside the transforms leaves torch.func in a usable state.
    assert top_hessian_eigenvalue(loss_fn, params, {}, None, iters=2).iterations == 2
