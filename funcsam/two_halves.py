"""Perturb and come back: SAM's climb to w + e over param groups, and the return to w bit for bit.

Each param group G has its own ``rho`` and ``adaptive`` (ASAM) flag; the norm is global over the
groups that perturb (SAM-ON, :mod:`funcsam.sam_on`: a group with ``perturb=False`` is neither
perturbed nor part of the norm, and still descends)::

    a_G, n_G = v_G, v_G                       (ASAM: T^2 v_G, T v_G with T = |w_G| + eta)
    e_G      = s * rho_G * a_G / (||n|| + eps)    ||n|| over every group that perturbs; s the mode's rho_scale

``v`` is the gradient at w for SAM's ascent (:func:`climb`, the first half of a SAM step), the base
optimizer's momentum for MSAM's (:func:`group_perturbation`). :func:`climb` keeps what it takes to
descend and to come back (a copy of w, g where the mode needs it, the buffers); :func:`come_back`
puts w and the buffers back. :class:`funcsam.SAMOptimizer`'s ``first_step``/``second_step`` and
``step(closure)`` are built on them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import buffers, sharding
from .grad_scaler import inverse_scale, unscaled_grads
from .modes.protocol import StepGradients
from .param_groups import described, with_gradients
from .perturbation import ascent_direction, sam_perturbation
from .tree import Tensor, clone_all, global_norm

__all__ = ["Perturbed", "TwoHalves", "climb", "come_back", "group_perturbation", "perturbs"]


class Perturbed(NamedTuple):
    """Between the two halves of a SAM step: what it takes to come back to w and descend from it."""

    groups: list  # (param_group, [params with a gradient]) pairs
    params: list  # the same params, flat
    unperturbed: list  # copies of w, to come back bit for bit
    grad_norm: Tensor  # the perturbation's norm: ||g|| (||T g|| with ASAM), over the groups that perturb
    first_grads: list | None  # g at w, unscaled, where the mode reads it after the pass at w + e
    first_norm: Tensor | None  # ||g|| when grad_norm is it (every group perturbs, none with ASAM), else None
    first_pass_buffers: list | None  # the model's buffers after the first pass
    pre_step_buffers: list | None  # the model's buffers before it (known in the closure style only)


class TwoHalves:
    """``first_step``/``second_step``, and the climb and descent from w + e that ``step(closure)`` shares.

    A mixin of :class:`funcsam.SAMOptimizer`, which provides ``mode``, ``model``, ``eta``, ``eps``,
    ``param_groups``, ``_perturbed`` (the :class:`Perturbed` snapshot between the halves) and
    ``_finish`` (the mode's direction and the base step).
    """

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Climb to w + e with e = rho * g / (||g|| + eps) (ASAM: rho * T^2 g / (||T g|| + eps)), g = p.grad.

        With fp16, pass the ``torch.amp.GradScaler`` that scaled the loss: the gradient is unscaled
        before its norm is taken. ``zero_grad=True`` clears the gradients for the second pass.
        Only modes that take two passes on every step (``mode.two_halves``: SAM, GSAM) fit this style.
        """
        self._check_two_halves("first_step")
        with self._over_shards():
            self._climb(with_gradients(self.param_groups, "the first backward pass"), grad_scaler, None,
                        keep_grads=not zero_grad)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Come back to w exactly and descend with the gradient in p.grad (taken at w + e).

        The step is skipped, without a host sync where the state allows it, when either gradient
        was non-finite. With ``model=`` the BatchNorm buffers go back to their first-pass values.
        Whatever happens, the parameters are back at w when this returns or raises.
        """
        self._check_two_halves("second_step")
        with self._over_shards():
            self._second_half(grad_scaler)
        if zero_grad:
            self.zero_grad()

    def _climb(self, groups: list, grad_scaler, pre_step_buffers: list | None, *, keep_grads: bool) -> None:
        """To w + e; g is kept where the mode reads it after the pass at w + e (a copy where the
        caller may still write p.grad in place, else the tensors themselves: p.grad is set to None)."""
        if self._perturbed is not None:
            self._come_back()
            raise RuntimeError("first_step() was called twice without second_step(); the parameters were put "
                               "back at w: call first_step(), backward at w + e, then second_step()")
        params = [p for _, group_params in groups for p in group_params]
        grads = unscaled_grads(params, inverse_scale(grad_scaler))
        first = (clone_all(grads) if keep_grads else grads) if self.mode.uses_first_gradient else None
        self._perturbed = climb(groups, grads, first, eta=self.eta, eps=self.eps, model=self.model,
                                pre_step_buffers=pre_step_buffers, rho_scale=self.mode.rho_scale)

    def _come_back(self) -> None:
        """Undo a climb whose second half will not come: params (and buffers) as before it."""
        perturbed, self._perturbed = self._perturbed, None
        come_back(perturbed, self.model, perturbed.pre_step_buffers or perturbed.first_pass_buffers)

    def _second_half(self, grad_scaler) -> None:
        """Back to w, then the mode's direction from g and g_sam (in p.grad) and the base step."""
        perturbed, self._perturbed = self._perturbed, None
        if perturbed is None:
            raise RuntimeError("second_step() needs a first_step() before it (the two come in pairs, "
                               "with a backward pass at w + e in between)")
        come_back(perturbed, self.model, perturbed.first_pass_buffers)
        missing = [p for p in perturbed.params if p.grad is None]
        if missing:
            raise RuntimeError(f"{len(missing)} parameter(s) had a gradient at w but none at w + e "
                               f"({described(missing, self.param_groups, self.model)}): the second backward "
                               "pass must compute the same loss as the first")
        sam_grads = unscaled_grads(perturbed.params, inverse_scale(grad_scaler))
        sam_norm = global_norm(sam_grads)
        finite = torch.isfinite(perturbed.grad_norm) & torch.isfinite(sam_norm)
        gradients = StepGradients(perturbed.first_grads, sam_grads, perturbed.first_norm)
        self._finish(perturbed.groups, gradients, finite, perturbed.unperturbed, perturbed.pre_step_buffers,
                     grad_scaler, held_norm=sam_norm)

    def _check_two_halves(self, method: str) -> None:
        if not self.mode.two_halves:
            raise RuntimeError(
                f"{method}() takes SAM's two backward passes on every step, but mode={self.mode!r} decides per step "
                "how many passes to take: call loss = optimizer.step(closure) instead (the closure zeroes the "
                "gradients, computes the loss, calls loss.backward() and returns the loss)")


def climb(groups: list, grads: list, first_grads: list | None, *, eta: float, eps: float,
          model: torch.nn.Module | None, pre_step_buffers: list | None, rho_scale: float = 1.0) -> Perturbed:
    """Move the params of ``groups`` (flat, aligned with the unscaled ``grads``) to w + e, returning
    the snapshot that :func:`come_back` and the descent need (``rho_scale``: the mode's)."""
    params = [p for _, group_params in groups for p in group_params]
    targets, ascent, norm = group_perturbation(groups, grads, eta=eta, eps=eps, having="a gradient",
                                               rho_scale=rho_scale)
    plain = len(targets) == len(params) and not any(group["adaptive"] for group, _ in groups)
    perturbed = Perturbed(groups, params, clone_all(sharding.local_views(params)), norm, first_grads,
                          norm if plain else None,
                          buffers.snapshot(model), pre_step_buffers)
    torch._foreach_add_(targets, ascent)
    return perturbed


def come_back(perturbed: Perturbed, model: torch.nn.Module | None, saved_buffers: list | None) -> None:
    """Params back at w exactly, and ``model``'s buffers back to ``saved_buffers`` (a snapshot or None)."""
    torch._foreach_copy_(sharding.local_views(perturbed.params), perturbed.unperturbed)
    buffers.restore(model, saved_buffers)


def group_perturbation(groups: list, vectors: list, *, eta: float, eps: float, having: str,
                       rho_scale: float = 1.0) -> tuple[list, list, Tensor]:
    """``(params, e, ||n||)`` over the groups of ``groups`` that perturb: their params and perturbations
    (flat), and the global norm (module docstring). ``vectors`` are v, flat over every group's params;
    ``having`` says which params the groups hold, for the error when none perturbs; ``rho_scale``
    multiplies every group's rho (the mode's :attr:`funcsam.Mode.rho_scale`)."""
    targets, ascent, perturbing, normed, start = [], [], [], [], 0
    for group, params in groups:
        end = start + len(params)
        if perturbs(group):
            shards = sharding.local_views(params)  # the params themselves when they are not sharded
            direction, group_normed = ascent_direction(vectors[start:end], shards, adaptive=group["adaptive"], eta=eta)
            perturbing.append((group, direction))
            targets += shards
            normed += group_normed
        start = end
    if not perturbing:
        raise ValueError(f"every param group with {having} has perturb=False: nothing would be perturbed. "
                         "Set perturb=True on the groups to perturb (funcsam.sam_on.sam_on_param_groups)")
    norm = global_norm(normed)
    for group, direction in perturbing:
        rho = group["rho"] if rho_scale == 1 else group["rho"] * rho_scale
        ascent += sam_perturbation(direction, norm, rho, eps)
    return targets, ascent, norm


def perturbs(group: dict) -> bool:
    """A group's ``perturb`` flag (SAM-ON, funcsam.sam_on): False leaves it unperturbed and out of the norm."""
    flag = group.get("perturb", True)
    if not isinstance(flag, bool):
        raise TypeError(f"a param group's perturb must be a bool (False: SAM-ON leaves it unperturbed), got {flag!r}")
    return flag
