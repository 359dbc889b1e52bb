"""A sharpness meter: the Hessian's eigenvalue of largest magnitude and its trace, from Hessian-vector products.

    Hv       = d/dt grad L(w + t v) |_{t=0}           (forward-over-reverse: torch.func.jvp of torch.func.grad)
    lambda:    v_0 random, ||v_0|| = 1;  v_{k+1} = H v_k / ||H v_k||;  lambda_k = v_k . H v_k
    tr(H)   ~= (1/n) sum_i v_i . H v_i,   v_i with independent +-1 entries (Hutchinson)

H is the Hessian of ``loss_fn`` with respect to ``params`` alone; ``buffers`` and ``batch`` are held
fixed. Norms and dot products are global: one scalar over every element of every leaf.

Usage::

    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    params  = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    top   = funcsam.top_hessian_eigenvalue(loss_fn, params, buffers, (x, y), iters=50)
    trace = funcsam.hessian_trace(loss_fn, params, buffers, (x, y), samples=100)
    print(float(top.value), float(trace.value), "+-", float(trace.stderr))

The meter differentiates ``loss_fn`` as it is given, so a model's mode decides what is measured:
in train mode BatchNorm normalises by the batch's own statistics (the loss that SAM minimises, with
the statistics' dependence on the weights included); in eval mode by the running statistics in
``buffers`` (the loss the model is evaluated with). Keep one mode when comparing checkpoints.
Either way nothing is mutated: the ``new_buffers`` output of ``loss_fn`` is discarded.

These are measurements, not training steps: power iteration stops on a tensor value (one host sync
per iteration), so call them eagerly, outside ``torch.compile``. Hessian-vector products run in the
params' dtype; dot products and norms accumulate in fp32 (fp64 if any leaf is fp64), as
:func:`funcsam.tree.global_norm` does, and the returned scalars have that dtype. Random vectors are
drawn on the CPU from a ``torch.Generator`` seeded with ``seed`` (never the global RNG), so a seed
gives the same vectors on every device.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, NamedTuple

import torch
from torch.func import grad, jvp

from .base import check_params
from .engine import unpack_loss_fn_output
from .tree import PyTree, Tensor, dot, flatten, global_norm, unflatten

HessianVectorProduct = Callable[[list], list]

# torch.func.jvp's first call imports torch's jvp decompositions, which torch.jit.script compiles and
# so warn that torch.jit.script is deprecated: torch's internals, nothing a caller can act on.
# Exactly that warning is silenced, around the jvp call only.
_JIT_SCRIPT_DEPRECATED = r"`?torch\.jit\.script`? is deprecated"


class HessianEigenvalue(NamedTuple):
    """What :func:`top_hessian_eigenvalue` returns.

    Fields:
        value: 0-dim tensor, the Rayleigh quotient v . Hv of ``vector``: the estimate of the
            eigenvalue of largest magnitude (negative if that eigenvalue is negative).
        vector: a pytree shaped like ``params``, global norm 1: the eigenvector estimate that
            ``value`` belongs to.
        iterations: the number of Hessian-vector products computed.
        converged: whether the Rayleigh quotient settled to ``tol`` (or H v was exactly 0) before
            ``iters`` ran out. False after a non-finite H v.
    """

    value: Tensor
    vector: PyTree
    iterations: int
    converged: bool


class HessianTrace(NamedTuple):
    """What :func:`hessian_trace` returns.

    Fields:
        value: 0-dim tensor, the mean of v_i . H v_i over the samples: an unbiased estimate of tr(H).
        stderr: 0-dim tensor, the standard error of that mean, std(v_i . H v_i) / sqrt(samples)
            (sample std, n - 1 in the denominator); NaN for one sample, where it cannot be estimated.
    """

    value: Tensor
    stderr: Tensor


def top_hessian_eigenvalue(
    loss_fn: Callable,
    params: PyTree,
    buffers: PyTree,
    batch: Any,
    *,
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> HessianEigenvalue:
    """Power iteration on Hessian-vector products: the eigenvalue of H of largest magnitude.

        v_0 = g / ||g||,  g ~ N(0, I) from ``seed``
        for k = 0, 1, ...:  lambda_k = v_k . H v_k;  stop if |lambda_k - lambda_{k-1}| < tol |lambda_k|
                            v_{k+1} = H v_k / ||H v_k||

    Power iteration converges to the eigenvalue of largest *magnitude*, at a rate set by
    |lambda_2 / lambda_1|. At (or near) a minimum H is positive semi-definite and this is the top
    eigenvalue, the usual sharpness; away from one a large negative eigenvalue may win, and the sign
    of ``value`` tells which. If two eigenvalues of opposite sign share the largest magnitude, the
    quotient need not settle (``converged`` stays False).

    Args:
        loss_fn: ``loss_fn(params, buffers, batch) -> (loss, (new_buffers, aux))`` with ``loss`` a
            0-dim tensor, e.g. from :func:`funcsam.make_loss_fn`. ``new_buffers`` and ``aux`` are ignored.
        params: a non-empty pytree of floating tensors: the point w where H is taken.
        buffers: passed to ``loss_fn`` unchanged (held fixed).
        batch: passed to ``loss_fn`` unchanged.
        iters: the most Hessian-vector products to compute (int >= 1). Default 20.
        tol: relative change of the Rayleigh quotient below which the iteration stops (> 0). Default 1e-3.
        seed: seeds the random start vector. Default 0.

    Returns:
        A :class:`HessianEigenvalue` ``(value, vector, iterations, converged)``.
    """
    _check_count("iters", iters)
    _check_tol(tol)
    _check_seed(seed)
    leaves, spec, hvp = _setup(loss_fn, params, buffers, batch)
    generator = torch.Generator().manual_seed(seed)
    start = [torch.randn(leaf.shape, generator=generator).to(leaf) for leaf in leaves]
    vector = torch._foreach_div(start, global_norm(start))

    previous = None
    for iteration in range(1, iters + 1):
        product = hvp(vector)
        value = dot(vector, product)
        norm = global_norm(product)
        if not bool(torch.isfinite(norm)):
            return HessianEigenvalue(value, unflatten(spec, vector), iteration, False)
        if not bool(norm > 0):
            # H v = 0: v is an eigenvector of eigenvalue 0; from a random start, H = 0 almost surely.
            return HessianEigenvalue(value, unflatten(spec, vector), iteration, True)
        converged = previous is not None and bool(torch.abs(value - previous) < tol * torch.abs(value))
        if converged or iteration == iters:
            break
        vector = torch._foreach_div(product, norm)
        previous = value
    return HessianEigenvalue(value, unflatten(spec, vector), iteration, converged)


def hessian_trace(
    loss_fn: Callable,
    params: PyTree,
    buffers: PyTree,
    batch: Any,
    *,
    samples: int = 100,
    seed: int = 0,
) -> HessianTrace:
    """Hutchinson's estimator of tr(H) with Rademacher vectors.

        tr(H) ~= mean_i v_i . H v_i,   v_i in {-1, +1}^d with independent, equally likely signs
        stderr = std_i(v_i . H v_i) / sqrt(samples)

    E[v v^T] = I makes every term an unbiased estimate; its variance is 2 sum_{j != k} H_jk^2, so a
    diagonal H is measured exactly (stderr 0) and the off-diagonal mass sets the noise.

    Args:
        loss_fn: ``loss_fn(params, buffers, batch) -> (loss, (new_buffers, aux))`` with ``loss`` a
            0-dim tensor, e.g. from :func:`funcsam.make_loss_fn`. ``new_buffers`` and ``aux`` are ignored.
        params: a non-empty pytree of floating tensors: the point w where H is taken.
        buffers: passed to ``loss_fn`` unchanged (held fixed).
        batch: passed to ``loss_fn`` unchanged.
        samples: the number of random vectors, one Hessian-vector product each (int >= 1). Default 100.
        seed: seeds the random vectors. Default 0.

    Returns:
        A :class:`HessianTrace` ``(value, stderr)``.
    """
    _check_count("samples", samples)
    _check_seed(seed)
    leaves, _, hvp = _setup(loss_fn, params, buffers, batch)
    generator = torch.Generator().manual_seed(seed)
    quadratic_forms = []
    for _ in range(samples):
        signs = [torch.randint(0, 2, leaf.shape, generator=generator, dtype=torch.int8) for leaf in leaves]
        vector = [(2 * s - 1).to(leaf) for s, leaf in zip(signs, leaves)]
        quadratic_forms.append(dot(vector, hvp(vector)))
    forms = torch.stack(quadratic_forms)
    if samples == 1:
        stderr = torch.full_like(forms[0], math.nan)
    else:
        stderr = forms.std(correction=1) / math.sqrt(samples)
    return HessianTrace(forms.mean(), stderr)


def _setup(
    loss_fn: Callable, params: PyTree, buffers: PyTree, batch: Any
) -> tuple[list[Tensor], Any, HessianVectorProduct]:
    """Validate; return ``(param_leaves, spec, hvp)`` with ``hvp(v) = H v`` on flat leaf lists."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, buffers, batch), got {loss_fn!r}")
    check_params(params)
    leaves, spec = flatten(params)
    # Detached, so that nothing here records into an autograd graph of the caller's.
    leaves = [leaf.detach() for leaf in leaves]

    def loss_of(flat: list) -> Tensor:
        return unpack_loss_fn_output(loss_fn(unflatten(spec, flat), buffers, batch))[0]

    gradient = grad(loss_of)

    def hvp(vector: list) -> list:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_JIT_SCRIPT_DEPRECATED, category=FutureWarning)
            product = jvp(gradient, (leaves,), (list(vector),))[1]
        return [t.detach() for t in product]

    return leaves, spec, hvp


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_tol(tol) -> None:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be a real number (a relative change, e.g. 1e-3), got {type(tol).__name__} {tol!r}")
    if not tol > 0:  # also rejects NaN
        raise ValueError(f"tol must be > 0 (a relative change, e.g. 1e-3), got {tol!r}")


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
