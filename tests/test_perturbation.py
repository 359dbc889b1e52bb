"""Properties of the perturbation and clipping functions, over random pytrees (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcsam

shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4)


def _leaves(shape_list, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(tuple(shape), generator=g, dtype=torch.float64) for shape in shape_list]


@settings(max_examples=50, deadline=None)
@given(shape_list=shapes, seed=st.integers(0, 2**16), rho=st.floats(1e-3, 10.0), scale=st.floats(1e-3, 1e3))
def test_sam_perturbation_has_norm_rho_along_the_gradient(shape_list, seed, rho, scale):
    grads = _leaves(shape_list, seed, scale)
    params = _leaves(shape_list, seed + 1)
    e, norm = funcsam.perturbation_and_norm(grads, params, rho)
    torch.testing.assert_close(norm, torch.sqrt(sum((g ** 2).sum() for g in grads)))
    torch.testing.assert_close(funcsam.global_norm(e), torch.tensor(rho, dtype=torch.float64), rtol=1e-5, atol=0)
    for ei, gi in zip(e, grads):
        torch.testing.assert_close(ei, gi * (rho / norm), rtol=1e-5, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(shape_list=shapes, seed=st.integers(0, 2**16), rho=st.floats(1e-3, 10.0), eta=st.floats(0.0, 1.0))
def test_asam_perturbation_matches_its_formula(shape_list, seed, rho, eta):
    grads = _leaves(shape_list, seed)
    params = _leaves(shape_list, seed + 1)
    e, norm = funcsam.perturbation_and_norm(grads, params, rho, adaptive=True, eta=eta)
    t = [p.abs() + eta for p in params]
    expected_norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, grads)))
    torch.testing.assert_close(norm, expected_norm, rtol=1e-5, atol=1e-12)
    for ei, ti, gi in zip(e, t, grads):
        torch.testing.assert_close(ei, rho * ti * ti * gi / (expected_norm + 1e-12), rtol=1e-5, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(shape_list=shapes, seed=st.integers(0, 2**16), max_norm=st.floats(1e-3, 10.0), scale=st.floats(1e-3, 1e3))
def test_clipping_never_exceeds_max_norm_and_keeps_direction(shape_list, seed, max_norm, scale):
    grads = _leaves(shape_list, seed, scale)
    clipped, norm = funcsam.clip_by_global_norm(grads, max_norm)
    clipped_norm = float(funcsam.global_norm(clipped))
    assert clipped_norm <= max_norm * (1 + 1e-5)
    if float(norm) <= max_norm:
        for c, g in zip(clipped, grads):
            torch.testing.assert_close(c, g)
    else:
        assert abs(clipped_norm - max_norm) <= 1e-4 * max_norm + 1e-5  # the 1e-6 in the denominator
    # torch's own clip_grad_norm_ agrees.
    tensors = [g.clone().requires_grad_() for g in grads]
    for t, g in zip(tensors, grads):
        t.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    for t, c in zip(tensors, clipped):
        torch.testing.assert_close(t.grad, c)
