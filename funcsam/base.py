"""Base optimizers as pure parts: the descent that SAM applies to its gradient.

A base optimizer is a small immutable object, built and validated once::

    base  = funcsam.adamw(betas=(0.9, 0.999), weight_decay=0.05)      # or funcsam.sgd(momentum=0.9)
    state = base.init(params)                                          # a NamedTuple of tensors
    params, state = base.update(param_leaves, grad_leaves, flat_state, lr)   # what sam_step calls

``update`` works on flat leaf lists (``flatten_state`` turns a state's per-parameter pytrees into
lists aligned with the parameter leaves) and is pure. ``lr`` is an argument, a float or a 0-dim
tensor, so a schedule never recompiles a compiled step. Each state has a ``count`` field, the
number of steps applied (a skipped step does not count).

    sgd(momentum, dampening, weight_decay, nesterov)   torch.optim.SGD     state MomentumState
    adam(betas, eps, weight_decay, amsgrad)             torch.optim.Adam    state AdamState (L2 added to g)
    adamw(betas, eps, weight_decay, amsgrad)            torch.optim.AdamW   state AdamState (decoupled decay)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch

from .adam import adam_update
from .hyperparameters import check_scalar
from .sgd import sgd_apply, sgd_direction
from .tree import PyTree, Tensor, flatten, leaf_paths, same_structure, select, unflatten


class MomentumState(NamedTuple):
    """The state of :func:`sgd` (and of ``sam_step``'s SGD shorthand).

    Fields:
        momentum_buffer: a pytree shaped like ``params``; zeros before the first step.
        count: int64 0-dim tensor, the number of steps applied (skipped steps do not count).
    """

    momentum_buffer: PyTree
    count: Tensor


class AdamState(NamedTuple):
    """The state of :func:`adam` and :func:`adamw`.

    Fields:
        exp_avg: pytree shaped like ``params``, the first moment m (zeros before the first step).
        exp_avg_sq: pytree shaped like ``params``, the second moment v.
        max_exp_avg_sq: pytree shaped like ``params``, the running maximum of v (amsgrad), else None.
        count: int64 0-dim tensor, the number of steps applied; the bias corrections use count + 1.
    """

    exp_avg: PyTree
    exp_avg_sq: PyTree
    max_exp_avg_sq: PyTree | None
    count: Tensor


def _zeros_like_tree(params: PyTree) -> PyTree:
    leaves, spec = flatten(params)
    return unflatten(spec, [torch.zeros_like(leaf) for leaf in leaves])


def _zero_count(params: PyTree) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=flatten(params)[0][0].device)


@dataclass(frozen=True)
class SGD:
    """torch.optim.SGD as a pure part; build it with :func:`sgd`. See ``funcsam.sgd_direction``."""

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    state_type = MomentumState

    def init(self, params: PyTree) -> MomentumState:
        """Zero momentum buffers shaped like ``params`` and count 0."""
        check_params(params)
        return MomentumState(momentum_buffer=_zeros_like_tree(params), count=_zero_count(params))

    @property
    def has_momentum(self) -> bool:
        return self.momentum != 0

    def momentum_of(self, state: MomentumState) -> list:
        """The momentum buffers of a flat state: the direction MSAM perturbs along."""
        return state.momentum_buffer

    def update(self, params: list, grads: list, state: MomentumState, lr) -> tuple[list, MomentumState]:
        """``(new_params, new_state)`` over flat lists (``state`` as from :func:`flatten_state`)."""
        direction, buffers = sgd_direction(
            params, grads, state.momentum_buffer, momentum=self.momentum, dampening=self.dampening,
            weight_decay=self.weight_decay, nesterov=self.nesterov, first_step=state.count == 0,
        )
        return sgd_apply(params, direction, lr), MomentumState(buffers, state.count + 1)


@dataclass(frozen=True)
class Adam:
    """torch.optim.Adam (``decoupled=False``) or AdamW (``decoupled=True``) as a pure part; build it
    with :func:`adam` or :func:`adamw`. See ``funcsam.adam_update``."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    decoupled: bool = False

    state_type = AdamState

    def init(self, params: PyTree) -> AdamState:
        """Zero moments shaped like ``params`` (and their running maximum with amsgrad), count 0."""
        check_params(params)
        return AdamState(
            exp_avg=_zeros_like_tree(params),
            exp_avg_sq=_zeros_like_tree(params),
            max_exp_avg_sq=_zeros_like_tree(params) if self.amsgrad else None,
            count=_zero_count(params),
        )

    has_momentum = True

    def momentum_of(self, state: AdamState) -> list:
        """The first moments of a flat state: the direction MSAM perturbs along."""
        return state.exp_avg

    def update(self, params: list, grads: list, state: AdamState, lr) -> tuple[list, AdamState]:
        """``(new_params, new_state)`` over flat lists (``state`` as from :func:`flatten_state`)."""
        new_params, exp_avg, exp_avg_sq, max_exp_avg_sq = adam_update(
            params, grads, state.exp_avg, state.exp_avg_sq, state.max_exp_avg_sq, state.count, lr,
            beta1=self.beta1, beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay,
            decoupled=self.decoupled,
        )
        return new_params, AdamState(exp_avg, exp_avg_sq, max_exp_avg_sq, state.count + 1)


BaseOptimizer = SGD | Adam


def sgd(momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> SGD:
    """torch.optim.SGD's update as a pure part (its exact semantics, first-step momentum included)::

        d = g + weight_decay * w;  buf = d (first step) or momentum * buf + (1 - dampening) * d
        d = d + momentum * buf (nesterov) or buf;  w = w - lr * d
    """
    check_sgd_hyperparameters(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    return SGD(float(momentum), float(dampening), float(weight_decay), nesterov)


def adam(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
         amsgrad: bool = False) -> Adam:
    """torch.optim.Adam's update as a pure part; ``weight_decay`` is an L2 term added to the gradient.
    The formula is in ``funcsam.adam_update``."""
    _check_adam_hyperparameters(betas, eps, weight_decay, amsgrad)
    return Adam(float(betas[0]), float(betas[1]), float(eps), float(weight_decay), amsgrad, decoupled=False)


def adamw(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
          amsgrad: bool = False) -> Adam:
    """torch.optim.AdamW's update as a pure part (decoupled weight decay, default 1e-2 as torch's):
    ``w = w * (1 - lr * weight_decay)`` before the Adam step. The formula is in ``funcsam.adam_update``."""
    _check_adam_hyperparameters(betas, eps, weight_decay, amsgrad)
    return Adam(float(betas[0]), float(betas[1]), float(eps), float(weight_decay), amsgrad, decoupled=True)


def check_sgd_hyperparameters(*, momentum, dampening, weight_decay, nesterov) -> None:
    """Raise on the first bad SGD hyperparameter, naming it (as torch.optim.SGD would refuse it)."""
    check_scalar("momentum", momentum)
    check_scalar("dampening", dampening)
    check_scalar("weight_decay", weight_decay)
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"nesterov=True needs momentum > 0 and dampening == 0 (as torch.optim.SGD), "
            f"got momentum={momentum}, dampening={dampening}"
        )


def _check_adam_hyperparameters(betas, eps, weight_decay, amsgrad) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for name, beta in zip(("betas[0]", "betas[1]"), betas):
        check_scalar(name, beta)
        if not beta < 1:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    check_scalar("eps", eps)
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps the Adam denominator positive), got {eps}")
    check_scalar("weight_decay", weight_decay)
    if not isinstance(amsgrad, bool):
        raise TypeError(f"amsgrad must be a bool, got {amsgrad!r}")


def check_base(base: Any) -> None:
    """``base`` must be a base optimizer made by ``funcsam.sgd``, ``funcsam.adam`` or ``funcsam.adamw``."""
    if not isinstance(base, (SGD, Adam)):
        called = f"funcsam.{getattr(base, '__name__', '')}()"
        hint = f" (pass an instance: {called}, not {called[:-2]})" if base in (sgd, adam, adamw) else ""
        raise TypeError(
            f"base must be a funcsam base optimizer such as funcsam.sgd(momentum=0.9) or funcsam.adamw(), "
            f"got {type(base).__name__}{hint}; a torch.optim class goes to funcsam.SAM instead"
        )


def check_params(params: PyTree) -> list[Tensor]:
    """The leaves of ``params``; raises if it is empty or has a leaf that is not a floating tensor."""
    leaves, _ = flatten(params)
    if not leaves:
        raise ValueError("params is empty: pass a non-empty pytree of tensors, e.g. dict(model.named_parameters())")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            what = f"a tensor of dtype {leaf.dtype}" if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise TypeError(
                f"params[{leaf_paths(params)[i]}] is {what}: every leaf of params must be a floating-point tensor "
                "(leave integer tensors in buffers)"
            )
    return leaves


def flatten_state(base: BaseOptimizer, state: Any, params: PyTree, spec, leaves: Sequence[Tensor]) -> Any:
    """``state`` with every per-parameter pytree flattened to a list aligned with ``leaves``.

    Checks that ``state`` is ``base``'s kind of state and that each of its per-parameter fields has
    the structure, shapes and dtypes of ``params`` (a mismatched buffer would broadcast into the
    parameters, or promote them to another dtype).
    """
    expected = base.state_type
    if not isinstance(state, expected):
        raise TypeError(
            f"momentum_state is a {type(state).__name__}, but base {type(base).__name__.lower()} carries a "
            f"funcsam.{expected.__name__}: create it with base.init(params)"
            + (" (or funcsam.init_momentum(params) for the SGD shorthand)" if expected is MomentumState else "")
        )
    fields = {}
    for name, value in zip(state._fields, state):
        if name == "count" or value is None:
            fields[name] = value
            continue
        field_leaves, field_spec = flatten(value)
        if not same_structure(field_spec, spec):
            raise ValueError(f"momentum_state.{name} does not have the structure of params: create the state with "
                             "base.init(params)")
        for i, (leaf, param) in enumerate(zip(field_leaves, leaves)):
            if leaf.shape != param.shape or leaf.dtype != param.dtype:
                raise ValueError(
                    f"momentum_state.{name}[{leaf_paths(params)[i]}] has shape {tuple(leaf.shape)} and dtype {leaf.dtype}, but the "
                    f"parameter has {tuple(param.shape)} and {param.dtype}: create the state with base.init(params)"
                )
        fields[name] = [leaf.detach() for leaf in field_leaves]
    count = fields["count"]
    if not (isinstance(count, torch.Tensor) and count.dim() == 0 and not count.is_floating_point()):
        raise TypeError("momentum_state.count must be a 0-dim integer tensor: create the state with base.init(params)")
    return type(state)(**fields)


def unflatten_state(spec, flat_state: Any) -> Any:
    """The inverse of :func:`flatten_state`."""
    return type(flat_state)(*[
        value if name == "count" or value is None else unflatten(spec, value)
        for name, value in zip(flat_state._fields, flat_state)
    ])


def select_state(condition: Tensor, if_true: Any, if_false: Any) -> Any:
    """Fieldwise ``torch.where(condition, a, b)`` of two flat states of one kind (a skipped step keeps
    ``if_false``)."""
    return type(if_true)(*[
        torch.where(condition, a, b) if name == "count" else (None if a is None else select(condition, a, b))
        for name, a, b in zip(if_true._fields, if_true, if_false)
    ])
