"""What every stateful SAM optimizer shares: perturb, come back, skip non-finite steps, fp16, BatchNorm.

:class:`SAMOptimizer` is a ``torch.optim.Optimizer`` shell around funcsam's pure functions
(``ascent_direction``, ``sam_perturbation``, ``clip_by_global_norm``, ``select``), in two styles::

    loss.backward(); opt.first_step(zero_grad=True)      w <- w + e  (e from the gradient in p.grad)
    loss.backward(); opt.second_step(zero_grad=True)     w <- w, then the descent with g_sam = p.grad

    loss = opt.step(closure)                             the same, calling closure() for the gradients

A subclass says how to descend (``_descend``): :class:`funcsam.SAM` calls any ``torch.optim``
optimizer, :class:`funcsam.SAMSGD` applies ``funcsam.sgd``'s pure update.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable, NamedTuple

import torch
from torch.amp.grad_scaler import OptState

from .clipping import clip_by_global_norm
from .hyperparameters import check_sam_options, check_scalar, is_static_zero
from .perturbation import ascent_direction, sam_perturbation
from .tree import Tensor, clone_all, global_norm, select


class _Perturbed(NamedTuple):
    """Between ``first_step`` and ``second_step``: what it takes to come back to w."""

    groups: list  # (param_group, [params with a gradient]) pairs
    params: list  # the same params, flat
    unperturbed: list  # copies of w, to come back bit for bit
    grad_norm: Tensor  # ||g|| (||T g|| with ASAM)
    first_pass_buffers: list | None  # the model's buffers after the first pass
    pre_step_buffers: list | None  # the model's buffers before it (known in the closure style only)


class SAMOptimizer(torch.optim.Optimizer):
    """The SAM machinery of :class:`funcsam.SAM` and :class:`funcsam.SAMSGD`; subclasses define ``_descend``.

    Each param group carries ``rho`` and ``adaptive``; the gradient norm that normalises the
    perturbation is global over all groups. After a step, ``p.grad`` holds the (unscaled, unclipped)
    SAM gradient and ``last_step_finite`` is a 0-dim bool tensor: False when the loss's gradient was
    non-finite in either pass and the step was skipped (params and optimizer state unchanged).
    """

    def __init__(self, params: Iterable, defaults: dict, *, eta: float, eps: float, max_grad_norm: float | None,
                 model: torch.nn.Module | None):
        check_sam_options(eta=eta, eps=eps, max_grad_norm=max_grad_norm)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.eta, self.eps, self.max_grad_norm, self.model = eta, eps, max_grad_norm, model
        self.last_step_finite: Tensor | None = None
        self._perturbed: _Perturbed | None = None
        self._gradients_seen: dict = {}
        super().__init__(params, defaults)

    # --- the two halves -------------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Climb to w + e with e = rho * g / (||g|| + eps) (ASAM: rho * T^2 g / (||T g|| + eps)), g = p.grad.

        With fp16, pass the ``torch.amp.GradScaler`` that scaled the loss: the gradient is unscaled
        before its norm is taken. ``zero_grad=True`` clears the gradients for the second pass.
        """
        self._first_step(grad_scaler, pre_step_buffers=None)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Come back to w exactly and descend with the gradient in p.grad (taken at w + e).

        The step is skipped, without a host sync where the state allows it, when either gradient
        was non-finite. With ``model=`` the BatchNorm buffers go back to their first-pass values.
        Whatever happens, the parameters are back at w when this returns or raises.
        """
        perturbed = self._perturbed
        if perturbed is None:
            raise RuntimeError("second_step() needs a first_step() before it (the two come in pairs, "
                               "with a backward pass at w + e in between)")
        self._perturbed = None
        torch._foreach_copy_(perturbed.params, perturbed.unperturbed)
        _restore_buffers(self.model, perturbed.first_pass_buffers)
        missing = sum(p.grad is None for p in perturbed.params)
        if missing:
            raise RuntimeError(
                f"{missing} parameter(s) had a gradient at w but none at w + e: the second backward pass must "
                "compute the same loss as the first"
            )
        sam_grads = _unscaled_grads(perturbed.params, _inverse_scale(grad_scaler))
        finite = torch.isfinite(perturbed.grad_norm) & torch.isfinite(global_norm(sam_grads))
        self._apply(perturbed.groups, sam_grads, finite, perturbed.unperturbed, perturbed.pre_step_buffers, grad_scaler)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, grad_scaler: torch.amp.GradScaler | None = None):
        """One SAM step through ``closure`` (which zeroes the gradients, computes the loss, calls
        ``backward`` and returns the loss); returns the loss at w, or None when the gradient at w
        was already there (see :meth:`_needs_first_gradient`).

        With fp16 autocast, pass the ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` the
        closure calls, and call ``grad_scaler.update()`` afterwards as usual (not ``grad_scaler.step``,
        which refuses closures). If the closure raises, the parameters are back at w.
        """
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step needs a closure: SAM evaluates the gradient twice. Pass a function "
                "that zeroes the gradients, computes the loss, calls loss.backward() and returns the loss: "
                "loss = optimizer.step(closure); or call first_step() and second_step() around your own backward passes"
            )
        loss, pre_step_buffers = None, None
        if self._needs_first_gradient():
            pre_step_buffers = _clone_buffers(self.model)
            loss = _evaluate(closure)
        groups = self._groups_with_gradients("the closure")
        if all(is_static_zero(group["rho"]) for group, _ in groups):  # SGD in one pass
            params = [p for _, group_params in groups for p in group_params]
            grads = _unscaled_grads(params, _inverse_scale(grad_scaler))
            self._apply(groups, grads, torch.isfinite(global_norm(grads)), clone_all(params), pre_step_buffers,
                        grad_scaler)
            return loss
        self._first_step(grad_scaler, pre_step_buffers)
        # As davda54's first_step(zero_grad=True): a closure that does not zero the gradients itself
        # would otherwise add the gradient at w + e to the one at w.
        self.zero_grad()
        try:
            _evaluate(closure)
        except BaseException:
            self._come_back()
            raise
        self.second_step(grad_scaler=grad_scaler)
        return loss

    # --- what subclasses decide -----------------------------------------------------------------

    def _needs_first_gradient(self) -> bool:
        """Whether ``step`` must call the closure for the gradient at w (SAMSGD: always)."""
        return True

    def _descend(self, groups: list, grads: list, finite: Tensor, unperturbed: list) -> None:
        """Apply the base optimizer's update with ``grads`` (flat over ``groups``), only where ``finite``."""
        raise NotImplementedError

    # --- shared parts ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, rejecting a bad ``rho``/``lr`` first."""
        merged = {**getattr(self, "defaults", {}), **param_group}
        self._check_group(merged)
        super().add_param_group(param_group)

    def _check_group(self, group: dict) -> None:
        check_scalar("rho", group.get("rho"), allow_tensor=True)
        if "lr" in group:
            check_scalar("lr", group["lr"], allow_tensor=True)
        if not isinstance(group.get("adaptive", False), bool):
            raise TypeError(f"adaptive must be a bool, got {group['adaptive']!r}")

    def _groups_with_gradients(self, where: str) -> list:
        groups = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        groups = [(group, params) for group, params in groups if params]
        if not groups:
            raise RuntimeError(
                f"no parameter has a gradient after {where}: call loss.backward() (or "
                "grad_scaler.scale(loss).backward()) so that SAM has a gradient to perturb with"
            )
        return groups

    def _first_step(self, grad_scaler, pre_step_buffers: list | None) -> None:
        if self._perturbed is not None:
            self._come_back()
            raise RuntimeError("first_step() was called twice without second_step(); the parameters were put "
                               "back at w: call first_step(), backward at w + e, then second_step()")
        groups = self._groups_with_gradients("the first backward pass")
        params = [p for _, group_params in groups for p in group_params]
        grads = _unscaled_grads(params, _inverse_scale(grad_scaler))
        directions, normed, start = [], [], 0
        for group, group_params in groups:
            end = start + len(group_params)
            direction, group_normed = ascent_direction(grads[start:end], group_params,
                                                       adaptive=group["adaptive"], eta=self.eta)
            directions.append(direction)
            normed += group_normed
            start = end
        grad_norm = global_norm(normed)
        del normed
        self._perturbed = _Perturbed(groups, params, clone_all(params), grad_norm, _clone_buffers(self.model),
                                     pre_step_buffers)
        for (group, group_params), direction in zip(groups, directions):
            torch._foreach_add_(group_params, sam_perturbation(direction, grad_norm, group["rho"], self.eps))

    def _come_back(self) -> None:
        """Undo a ``first_step`` whose second half will not come: params (and buffers) as before it."""
        perturbed, self._perturbed = self._perturbed, None
        torch._foreach_copy_(perturbed.params, perturbed.unperturbed)
        _restore_buffers(self.model, perturbed.pre_step_buffers or perturbed.first_pass_buffers)

    def _apply(self, groups, grads, finite, unperturbed, pre_step_buffers, grad_scaler) -> None:
        if self.max_grad_norm is not None:
            grads, _ = clip_by_global_norm(grads, self.max_grad_norm)
        params = [p for _, group_params in groups for p in group_params]
        try:
            self._descend(groups, grads, finite, unperturbed)
        except BaseException:
            torch._foreach_copy_(params, unperturbed)
            raise
        if pre_step_buffers:  # a skipped step keeps the buffers too
            buffers = list(self.model.buffers())
            torch._foreach_copy_(buffers, select(finite, buffers, pre_step_buffers))
        self.last_step_finite = finite
        if grad_scaler is not None and grad_scaler.is_enabled():
            _record_found_inf(grad_scaler, self, finite)
        self._opt_called = True  # what a torch.optim.lr_scheduler checks for before its own step
        self._gradients_seen = {p: (weakref.ref(p.grad), p.grad._version) for p in params}

    def _has_new_gradient(self) -> bool:
        """Whether some parameter's ``.grad`` was written since the last step left it (new, or changed in place)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                seen = self._gradients_seen.get(p)
                if seen is None or seen[0]() is not p.grad or seen[1] != p.grad._version:
                    return True
        return False


def _evaluate(closure: Callable[[], Tensor]) -> Tensor:
    with torch.enable_grad():
        return closure()


def _inverse_scale(grad_scaler) -> Tensor | None:
    if grad_scaler is None:
        return None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler or None, got {type(grad_scaler).__name__} "
                        f"{grad_scaler!r}")
    if not grad_scaler.is_enabled():
        return None
    scale = grad_scaler._scale
    if scale is None:
        raise RuntimeError(
            "grad_scaler has not scaled a loss yet: call grad_scaler.scale(loss).backward() before the step"
        )
    return scale.double().reciprocal().float()


def _unscaled_grads(params: list, inverse_scale: Tensor | None) -> list:
    grads = [p.grad for p in params]
    if inverse_scale is not None:
        # In place, as GradScaler.unscale_ does: p.grad ends up holding the true gradient.
        torch._foreach_mul_(grads, inverse_scale)
    return grads


def _record_found_inf(grad_scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, finite: Tensor) -> None:
    """Leave in ``grad_scaler`` what its own ``unscale_``/``step`` would, so ``update()`` works as usual."""
    state = grad_scaler._per_optimizer_states[id(optimizer)]
    found_inf = (~finite).to(torch.float32)
    state["found_inf_per_device"] = {found_inf.device: found_inf}
    state["stage"] = OptState.STEPPED


def _clone_buffers(model: torch.nn.Module | None) -> list | None:
    return None if model is None else clone_all(list(model.buffers()))


def _restore_buffers(model: torch.nn.Module | None, snapshot: list | None) -> None:
    if model is None or snapshot is None:
        return
    buffers = list(model.buffers())
    if buffers:
        torch._foreach_copy_(buffers, snapshot)
