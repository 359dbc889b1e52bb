"""``SAMSGD``: a drop-in ``torch.optim.Optimizer`` for closure-style training loops.

It is a thin stateful shell around the functions that :func:`funcsam.sam_step` uses
(``ascent_direction``/``sam_perturbation``, ``clip_by_global_norm``, ``sgd_direction``/``sgd_apply``),
so both APIs compute the same step. Usage, as in ``sam.pytorch``::

    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05)

    def closure():
        optimizer.zero_grad()
        loss = criterion(model(inputs), targets)
        loss.backward()
        return loss

    loss = optimizer.step(closure)        # the loss at w, from the first call of the closure
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.amp.grad_scaler import OptState

from .clipping import clip_by_global_norm
from .base import check_sgd_hyperparameters
from .hyperparameters import check_sam_hyperparameters, is_static_zero
from .perturbation import ascent_direction, sam_perturbation
from .sgd import sgd_apply, sgd_direction
from .tree import Tensor, clone_all, global_norm, select


class SAMSGD(torch.optim.Optimizer):
    """SAM with torch.optim.SGD as the base optimizer; ``step`` takes a closure and calls it twice.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``. Each group may set
            its own ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``nesterov`` and ``rho``;
            the gradient norm that normalises the perturbation is global over all groups.
        lr, momentum, dampening, weight_decay, nesterov: torch.optim.SGD's, with its exact semantics.
        rho: neighbourhood radius (default 0.05); 0 in every group gives plain SGD with one pass.
        adaptive: ASAM, e = rho * T^2 g / (||T g|| + eps) with T = |w| + eta.
        eta: ASAM's offset (default 0).
        eps: added to the gradient norm (default 1e-12); a zero gradient gives e = 0.
        max_grad_norm: if given, the SAM gradient is clipped to this global norm before the update.
        model: if given, its buffers (BatchNorm running statistics) are restored after the second
            pass, so they hold the statistics of the unperturbed pass only, as with ``sam_step``.
            Without it, the perturbed pass updates them too (as in ``sam.pytorch``).

    After ``step``, ``p.grad`` holds the (unscaled) SAM gradient and ``last_step_finite`` is a
    0-dim bool tensor: False when a gradient was non-finite and the step was skipped.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        max_grad_norm: float | None = None,
        model: torch.nn.Module | None = None,
    ):
        check_sam_hyperparameters(lr=lr, rho=rho, eta=eta, eps=eps, max_grad_norm=max_grad_norm)
        check_sgd_hyperparameters(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.adaptive = bool(adaptive)
        self.eta = eta
        self.eps = eps
        self.max_grad_norm = max_grad_norm
        self.model = model
        self.last_step_finite: Tensor | None = None
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, rho=rho)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, rejecting bad hyperparameters first."""
        merged = {**getattr(self, "defaults", {}), **param_group}
        check_sam_hyperparameters(lr=merged["lr"], rho=merged["rho"], eta=self.eta, eps=self.eps,
                                  max_grad_norm=self.max_grad_norm)
        check_sgd_hyperparameters(momentum=merged["momentum"], dampening=merged["dampening"],
                                  weight_decay=merged["weight_decay"], nesterov=merged["nesterov"])
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``; a ``torch.optim.SGD`` checkpoint loads too,
        its groups taking this optimizer's ``rho`` (and any other missing key) from the constructor."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, grad_scaler: torch.amp.GradScaler | None = None):
        """Two gradient evaluations through ``closure`` and one SGD update; returns the loss at w.

        With fp16 autocast, pass the ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` the
        closure calls: the gradients are unscaled here (the first before its norm is taken), an
        overflow in either pass skips the step, and the usual ``grad_scaler.update()`` afterwards
        backs the scale off or grows it. Do not call ``grad_scaler.step``: it does not take closures.
        """
        if closure is None:
            raise TypeError(
                "SAMSGD.step needs a closure: SAM evaluates the gradient twice. Pass a function that "
                "zeroes the gradients, computes the loss, calls loss.backward() and returns the loss: "
                "loss = optimizer.step(closure)"
            )
        loss = _evaluate(closure)
        groups = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        groups = [(group, params) for group, params in groups if params]
        if not groups:
            return loss
        params = [p for _, group_params in groups for p in group_params]
        inverse_scale = _inverse_scale(grad_scaler)

        if all(is_static_zero(group["rho"]) for group, _ in groups):
            sam_grads = _unscaled_grads(params, inverse_scale)
            finite = torch.isfinite(global_norm(sam_grads))
        else:
            grad_norm, sam_grads = self._second_pass(closure, groups, params, inverse_scale)
            finite = torch.isfinite(grad_norm) & torch.isfinite(global_norm(sam_grads))

        if self.max_grad_norm is not None:
            sam_grads, _ = clip_by_global_norm(sam_grads, self.max_grad_norm)
        start = 0
        for group, group_params in groups:
            group_grads = sam_grads[start:start + len(group_params)]
            start += len(group_params)
            self._descend(group, group_params, group_grads, finite)

        self.last_step_finite = finite
        if inverse_scale is not None:
            _record_found_inf(grad_scaler, self, finite)
        return loss

    def _second_pass(self, closure, groups, params, inverse_scale):
        """Move to w + e, re-evaluate, move back to w exactly; returns (||g||, g_sam).

        Extra memory: one copy of the parameters (to come back to w bit for bit). No reference to
        the first gradients is held across the second closure, so its ``zero_grad`` frees them.
        """
        direction, normed = ascent_direction(
            _unscaled_grads(params, inverse_scale), params, adaptive=self.adaptive, eta=self.eta
        )
        grad_norm = global_norm(normed)
        unperturbed = clone_all(params)
        first_pass_buffers = None if self.model is None else clone_all(list(self.model.buffers()))
        start = 0
        for group, group_params in groups:
            end = start + len(group_params)
            torch._foreach_add_(group_params, sam_perturbation(direction[start:end], grad_norm, group["rho"], self.eps))
            start = end
        del direction, normed
        _evaluate(closure)
        torch._foreach_copy_(params, unperturbed)
        _restore_buffers(self.model, first_pass_buffers)
        missing = [i for i, p in enumerate(params) if p.grad is None]
        if missing:
            raise RuntimeError(
                f"{len(missing)} parameter(s) had a gradient in the first call of the closure but none in the "
                "second: the closure must compute the same loss both times"
            )
        return grad_norm, _unscaled_grads(params, inverse_scale)

    def _descend(self, group: dict, params: list, grads: list, finite: Tensor) -> None:
        """SGD update of one group, applied only where ``finite`` (no host sync)."""
        momentum = group["momentum"]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if "step" not in state:
                # A buffer loaded from a torch.optim.SGD checkpoint means its first step is past.
                has_buffer = state.get("momentum_buffer") is not None
                state["step"] = torch.tensor(1 if has_buffer else 0, dtype=torch.int64, device=p.device)
        buffers = []
        if momentum != 0:
            buffers = [
                state["momentum_buffer"] if state.get("momentum_buffer") is not None else torch.zeros_like(p)
                for p, state in zip(params, states)
            ]
        direction, new_buffers = sgd_direction(
            params, grads, buffers,
            momentum=momentum, dampening=group["dampening"], weight_decay=group["weight_decay"],
            nesterov=group["nesterov"], first_step=states[0]["step"] == 0,
        )
        stepped = sgd_apply(params, direction, group["lr"])
        torch._foreach_copy_(params, select(finite, stepped, params))
        if momentum != 0:
            for state, buffer in zip(states, select(finite, new_buffers, buffers)):
                state["momentum_buffer"] = buffer
        torch._foreach_add_([state["step"] for state in states], finite.to(torch.int64))


def _evaluate(closure: Callable[[], Tensor]) -> Tensor:
    with torch.enable_grad():
        return closure()


def _inverse_scale(grad_scaler) -> Tensor | None:
    if grad_scaler is None or not grad_scaler.is_enabled():
        return None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    scale = grad_scaler._scale
    if scale is None:
        raise RuntimeError(
            "grad_scaler has not scaled a loss yet: call grad_scaler.scale(loss).backward() inside the closure"
        )
    return scale.double().reciprocal().float()


def _unscaled_grads(params: list, inverse_scale: Tensor | None) -> list:
    grads = [p.grad for p in params]
    if inverse_scale is not None:
        # In place, as GradScaler.unscale_ does: p.grad ends up holding the true gradient.
        torch._foreach_mul_(grads, inverse_scale)
    return grads


def _record_found_inf(grad_scaler: torch.amp.GradScaler, optimizer: SAMSGD, finite: Tensor) -> None:
    """Leave in ``grad_scaler`` what its own ``unscale_``/``step`` would, so ``update()`` works as usual."""
    state = grad_scaler._per_optimizer_states[id(optimizer)]
    found_inf = (~finite).to(torch.float32)
    state["found_inf_per_device"] = {found_inf.device: found_inf}
    state["stage"] = OptState.STEPPED


def _restore_buffers(model: torch.nn.Module | None, snapshot: list | None) -> None:
    if model is None:
        return
    buffers = list(model.buffers())
    if buffers:
        torch._foreach_copy_(buffers, snapshot)
