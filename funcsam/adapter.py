"""What every stateful SAM optimizer shares: perturb, come back, skip non-finite steps, fp16, BatchNorm.

:class:`SAMOptimizer` is a ``torch.optim.Optimizer`` shell around funcsam's pure functions
(``ascent_direction``, ``sam_perturbation``, ``clip_by_global_norm``, ``select``), in two styles::

    loss.backward(); opt.first_step(zero_grad=True)      w <- w + e  (e from the gradient in p.grad)
    loss.backward(); opt.second_step(zero_grad=True)     w <- w, then the descent with g_sam = p.grad

    loss = opt.step(closure)                             the same, calling closure() for the gradients

A subclass says how to descend (``_descend``): :class:`funcsam.SAM` calls any ``torch.optim``
optimizer, :class:`funcsam.SAMSGD` applies ``funcsam.sgd``'s pure update. ``mode=`` picks a cheaper
SAM (schedules, LookSAM, MSAM, GSAM, AESAM; :mod:`funcsam.adapter_modes`): ``step(closure)`` then takes
one pass or two per step, and changes the gradient the base step applies, as :mod:`funcsam.modes` and
:mod:`funcsam.policy` do.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch.amp.grad_scaler import OptState

from .adapter_modes import (
    AESAM, MSAM, LookSAM, cheap_step_gradient, check_mode, check_two_halves, keeps_first_gradient, sam_step_gradient,
    takes_full_sam,
)
from .clipping import clip_by_global_norm
from .hyperparameters import check_sam_options, check_scalar, is_static_zero
from .perturbation import ascent_direction, sam_perturbation
from .modes.aesam import adaptive_statistics
from .tree import Tensor, clone_all, global_norm, select


class _Perturbed(NamedTuple):
    """Between ``first_step`` and ``second_step``: what it takes to come back to w."""

    groups: list  # (param_group, [params with a gradient]) pairs
    params: list  # the same params, flat
    unperturbed: list  # copies of w, to come back bit for bit
    grad_norm: Tensor  # ||g|| (||T g|| with ASAM)
    first_pass_buffers: list | None  # the model's buffers after the first pass
    pre_step_buffers: list | None  # the model's buffers before it (known in the closure style only)


class _AdaptiveStatistics(NamedTuple):
    """AESAM's state in the optimizer: 0-dim tensors on the parameters' device (``funcsam.AdaptiveState``'s)."""

    mean: Tensor  # fp32, the running mean of ||g||^2
    var: Tensor  # fp32, its running variance
    count: Tensor  # int64, how many ||g||^2 the statistics hold (skipped steps add none)
    take_next: Tensor  # bool, whether the next step takes SAM (True before the first step)


_ADAPTIVE_DTYPES = _AdaptiveStatistics(torch.float32, torch.float32, torch.int64, torch.bool)


class _ModeState(NamedTuple):
    """What ``state_dict()["funcsam"]`` restores: the step count and the modes' own state."""

    steps_taken: int
    looksam_g_v: dict  # LookSAM's g_v by parameter
    adaptive: _AdaptiveStatistics | None  # AESAM's statistics (None: fresh ones)


class SAMOptimizer(torch.optim.Optimizer):
    """The SAM machinery of :class:`funcsam.SAM` and :class:`funcsam.SAMSGD`; subclasses define ``_descend``.

    Each param group carries ``rho`` and ``adaptive``; the gradient norm that normalises the
    perturbation is global over all groups. After a step, ``p.grad`` holds the (unscaled, unclipped)
    gradient the base step applied (the SAM gradient; GSAM's d, LookSAM's estimate on its cheap
    steps) and ``last_step_finite`` is a 0-dim bool tensor: False when the loss's gradient was
    non-finite in either pass and the step was skipped (params and optimizer state unchanged).

    ``mode`` (None, ``funcsam.every(k)``, ``funcsam.late(s)``, ``LookSAM``, ``MSAM``, ``GSAM``, ``AESAM``)
    and ``steps_taken``, the number of steps taken (skipped ones included; the index a schedule reads),
    are described in :mod:`funcsam.adapter_modes`; ``state_dict()`` saves ``steps_taken``, LookSAM's
    g_v and AESAM's statistics under the key ``"funcsam"``, so a resumed run picks the same steps.
    """

    def __init__(self, params: Iterable, defaults: dict, *, eta: float, eps: float, max_grad_norm: float | None,
                 model: torch.nn.Module | None, mode: Any = None):
        check_sam_options(eta=eta, eps=eps, max_grad_norm=max_grad_norm)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.eta, self.eps, self.max_grad_norm, self.model = eta, eps, max_grad_norm, model
        self.mode = check_mode(mode)
        self.steps_taken = 0
        self.last_step_finite: Tensor | None = None
        self._perturbed: _Perturbed | None = None
        self._first_grads: dict | None = None  # g by parameter, kept across the pass at w + e (GSAM, LookSAM)
        self._looksam_g_v: dict = {}  # LookSAM's g_v by parameter (zeros where absent)
        self._first_gradient_norm: Tensor | None = None  # AESAM: this step's ||g|| at w, until _apply reads it
        self._gradients_seen: dict = {}
        super().__init__(params, defaults)
        self._adaptive = self._fresh_adaptive_statistics() if isinstance(self.mode, AESAM) else None

    # --- the two halves -------------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Climb to w + e with e = rho * g / (||g|| + eps) (ASAM: rho * T^2 g / (||T g|| + eps)), g = p.grad.

        With fp16, pass the ``torch.amp.GradScaler`` that scaled the loss: the gradient is unscaled
        before its norm is taken. ``zero_grad=True`` clears the gradients for the second pass.
        Only ``mode=None`` and ``GSAM`` take this style; the other modes need ``step(closure)``.
        """
        check_two_halves(self.mode, "first_step")
        self._climb(grad_scaler, pre_step_buffers=None)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Come back to w exactly and descend with the gradient in p.grad (taken at w + e).

        The step is skipped, without a host sync where the state allows it, when either gradient
        was non-finite. With ``model=`` the BatchNorm buffers go back to their first-pass values.
        Whatever happens, the parameters are back at w when this returns or raises.
        """
        check_two_halves(self.mode, "second_step")
        self._second_step(grad_scaler)
        if zero_grad:
            self.zero_grad()

    def _second_step(self, grad_scaler) -> None:
        perturbed = self._perturbed
        if perturbed is None:
            raise RuntimeError("second_step() needs a first_step() before it (the two come in pairs, "
                               "with a backward pass at w + e in between)")
        self._perturbed = None
        first_grads, self._first_grads = self._first_grads, None
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
        first = None if first_grads is None else [first_grads[p] for p in perturbed.params]
        self._apply_sam_gradient(perturbed.groups, first, sam_grads, finite, perturbed.unperturbed,
                                 perturbed.pre_step_buffers, grad_scaler)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, grad_scaler: torch.amp.GradScaler | None = None):
        """One SAM step through ``closure`` (which zeroes the gradients, computes the loss, calls
        ``backward`` and returns the loss); returns the loss at w, or None when the gradient at w
        was already there (see :meth:`_needs_first_gradient`).

        With fp16 autocast, pass the ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` the
        closure calls, and call ``grad_scaler.update()`` afterwards as usual (not ``grad_scaler.step``,
        which refuses closures). If the closure raises, the parameters are back at w.

        The ``mode`` decides the passes: a one-pass step (a schedule's base step, LookSAM's cheap
        step) calls the closure only if the gradient at w is not there yet; MSAM always calls it
        once, at w + e, and returns that loss. AESAM reads its ``take_next`` on the host first (one
        sync per step on a GPU, see :class:`funcsam.AESAM`).
        """
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step needs a closure: SAM evaluates the gradient twice. Pass a function "
                "that zeroes the gradients, computes the loss, calls loss.backward() and returns the loss: "
                "loss = optimizer.step(closure); or call first_step() and second_step() around your own backward passes"
            )
        if isinstance(self.mode, MSAM):
            return self._momentum_step(closure, grad_scaler)
        if not self._takes_sam():
            return self._one_pass_step(closure, grad_scaler)
        loss, pre_step_buffers = None, None
        if self._needs_first_gradient():
            pre_step_buffers = _clone_buffers(self.model)
            loss = _evaluate(closure)
        groups = self._groups_with_gradients("the closure")
        if all(is_static_zero(group["rho"]) for group, _ in groups):  # SGD in one pass: g_sam is g
            self._one_pass(groups, pre_step_buffers, grad_scaler, sam_step=True)
            return loss
        self._climb(grad_scaler, pre_step_buffers)
        # As davda54's first_step(zero_grad=True): a closure that does not zero the gradients itself
        # would otherwise add the gradient at w + e to the one at w.
        self.zero_grad()
        try:
            _evaluate(closure)
        except BaseException:
            self._come_back()
            raise
        self._second_step(grad_scaler)
        return loss

    # --- the cheaper modes' steps ---------------------------------------------------------------

    def _takes_sam(self) -> bool:
        """Whether this step takes SAM's two passes: the schedule's choice, or AESAM's take_next."""
        if isinstance(self.mode, AESAM):
            # A host read of a 0-dim bool: free on the CPU, a sync with the last step on a GPU.
            return bool(self._adaptive.take_next)
        return takes_full_sam(self.mode, self.steps_taken)

    def _fresh_adaptive_statistics(self) -> _AdaptiveStatistics:
        """AESAM's statistics before the first step: empty, and take_next True (the first step takes SAM)."""
        device = self._all_params()[0].device
        return _AdaptiveStatistics(*(torch.tensor(True if dtype == torch.bool else 0, dtype=dtype, device=device)
                                     for dtype in _ADAPTIVE_DTYPES))

    def _observe(self, finite: Tensor) -> None:
        """AESAM: fold this step's ||g||^2 into the statistics and decide the next step (all on the
        device), with the threshold of this step's index; a skipped step keeps them."""
        norm, self._first_gradient_norm = self._first_gradient_norm, None
        if norm is None:
            raise RuntimeError("internal: an AESAM step reached the base step without its gradient norm")
        statistics = self._adaptive
        self._adaptive = _AdaptiveStatistics(*adaptive_statistics(
            statistics.mean, statistics.var, statistics.count, statistics.take_next, norm.square(),
            threshold=self.mode.threshold(self.steps_taken), delta=self.mode.delta, finite=finite))

    def _one_pass_step(self, closure, grad_scaler):
        """A schedule's base step or LookSAM's cheap step: the base step with the gradient at w."""
        loss, pre_step_buffers = None, None
        if self._needs_first_gradient():
            pre_step_buffers = _clone_buffers(self.model)
            loss = _evaluate(closure)
        self._one_pass(self._groups_with_gradients("the closure"), pre_step_buffers, grad_scaler, sam_step=False)
        return loss

    def _one_pass(self, groups, pre_step_buffers, grad_scaler, *, sam_step: bool) -> None:
        """The base step with the gradient in ``p.grad`` as the mode shapes it: as a SAM step's g_sam
        (a SAM step with rho = 0 everywhere, where g_sam is g) or as a cheap step's g."""
        params = [p for _, group_params in groups for p in group_params]
        grads = _unscaled_grads(params, _inverse_scale(grad_scaler))
        grad_norm = global_norm(grads)
        finite = torch.isfinite(grad_norm)
        if isinstance(self.mode, AESAM):
            self._first_gradient_norm = grad_norm
        if sam_step:
            self._apply_sam_gradient(groups, grads, grads, finite, clone_all(params), pre_step_buffers, grad_scaler)
            return
        g_v = self._looksam_g_v_of(params) if isinstance(self.mode, LookSAM) else None
        _hold(grads, cheap_step_gradient(self.mode, grads, g_v, self.eps))
        self._apply(groups, grads, finite, clone_all(params), pre_step_buffers, grad_scaler)

    def _apply_sam_gradient(self, groups, first_grads, sam_grads, finite, unperturbed, pre_step_buffers,
                            grad_scaler) -> None:
        """The base step with the gradient the mode makes of g and g_sam (held in ``p.grad``); LookSAM
        keeps its new g_v, unless the step is skipped."""
        params = [p for _, group_params in groups for p in group_params]
        grads, g_v = sam_step_gradient(self.mode, first_grads, sam_grads, self.eps)
        _hold(sam_grads, grads)
        if g_v is not None:
            g_v = select(finite, g_v, self._looksam_g_v_of(params))
        self._apply(groups, sam_grads, finite, unperturbed, pre_step_buffers, grad_scaler)
        if g_v is not None:
            self._looksam_g_v.update(zip(params, g_v))

    def _climb(self, grad_scaler, pre_step_buffers: list | None) -> None:
        """``_first_step``, keeping a copy of the unscaled g where the mode needs it after the pass at w + e."""
        first_grads = None
        if keeps_first_gradient(self.mode):
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            grads, inverse_scale = [p.grad for p in params], _inverse_scale(grad_scaler)
            first_grads = dict(zip(params, clone_all(grads) if inverse_scale is None
                                   else torch._foreach_mul(grads, inverse_scale)))
        self._first_step(grad_scaler, pre_step_buffers)
        self._first_grads = first_grads
        if isinstance(self.mode, AESAM):  # p.grad holds the unscaled g at w until the pass at w + e
            self._first_gradient_norm = global_norm([p.grad for p in self._perturbed.params])

    def _momentum_step(self, closure, grad_scaler):
        """MSAM: one pass at w + e, e = -rho * m / (||m|| + eps) (ASAM: -rho * T^2 m / (||T m|| + eps)),
        back to w exactly, and the base step with that gradient. Without momentum yet, the base step.
        The pass's BatchNorm updates are kept (there is no pass at w); a skipped step undoes them."""
        momenta = self._momenta()
        if not momenta:  # the first step: m = 0 gives e = 0, the base step
            return self._one_pass_step(closure, grad_scaler)
        perturbed, ascent = self._momentum_ascent(momenta)
        pre_step_buffers, unperturbed = _clone_buffers(self.model), clone_all(perturbed)
        try:
            torch._foreach_sub_(perturbed, ascent)
            # A closure that does not zero the gradients would otherwise add g(w + e) to a gradient at w.
            self.zero_grad()
            loss = _evaluate(closure)
        except BaseException:
            torch._foreach_copy_(perturbed, unperturbed)
            _restore_buffers(self.model, pre_step_buffers)
            raise
        torch._foreach_copy_(perturbed, unperturbed)
        del unperturbed
        self._one_pass(self._groups_with_gradients("the closure"), pre_step_buffers, grad_scaler, sam_step=False)
        return loss

    def _momenta(self) -> dict:
        """The base optimizer's momentum by parameter, where it has one yet (MSAM's direction)."""
        momenta = {}
        for index, group in enumerate(self.param_groups):
            self._check_group_fits_mode(group, f"param group {index}")
            for p in group["params"]:
                momentum = self._momentum(p)
                if momentum is not None:
                    momenta[p] = momentum
        return momenta

    def _momentum_ascent(self, momenta: dict) -> tuple[list, list]:
        """``(params, rho * m / (||m|| + eps))`` over the groups that perturb, flat; the norm is global
        and each group has its own rho and ASAM flag, as in ``_first_step``."""
        groups = [(group, [p for p in group["params"] if p in momenta]) for group in self.param_groups]
        groups = [(group, params) for group, params in groups if params and _perturbs(group)]
        if not groups:
            raise ValueError("every param group with momentum has perturb=False: MSAM would perturb nothing. "
                             "Set perturb=True on the groups to perturb (funcsam.sam_on.sam_on_param_groups)")
        directions, normed = [], []
        for group, params in groups:
            direction, group_normed = ascent_direction([momenta[p] for p in params], params,
                                                       adaptive=group["adaptive"], eta=self.eta)
            directions.append(direction)
            normed += group_normed
        norm = global_norm(normed)
        ascent = [e for (group, _), direction in zip(groups, directions)
                  for e in sam_perturbation(direction, norm, group["rho"], self.eps)]
        return [p for _, params in groups for p in params], ascent

    def _looksam_g_v_of(self, params: list) -> list:
        held = [self._looksam_g_v.get(p) for p in params]
        return [torch.zeros_like(p) if g_v is None else g_v for p, g_v in zip(params, held)]

    # --- what subclasses decide -----------------------------------------------------------------

    def _needs_first_gradient(self) -> bool:
        """Whether ``step`` must call the closure for the gradient at w (SAMSGD: always)."""
        return True

    def _momentum(self, p: Tensor) -> Tensor | None:
        """The base optimizer's momentum of ``p``, the direction MSAM perturbs along (None before it exists)."""
        raise NotImplementedError

    def _descend(self, groups: list, grads: list, finite: Tensor, unperturbed: list) -> None:
        """Apply the base optimizer's update with ``grads`` (flat over ``groups``), only where ``finite``."""
        raise NotImplementedError

    # --- shared parts ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, rejecting a bad ``rho``/``lr`` first."""
        merged = {**getattr(self, "defaults", {}), **param_group}
        self._check_group(merged)
        self._check_group_fits_mode(merged, "the param group")
        super().add_param_group(param_group)

    def _check_group(self, group: dict) -> None:
        check_scalar("rho", group.get("rho"), allow_tensor=True)
        if "lr" in group:
            check_scalar("lr", group["lr"], allow_tensor=True)
        if not isinstance(group.get("adaptive", False), bool):
            raise TypeError(f"adaptive must be a bool, got {group['adaptive']!r}")

    def _check_group_fits_mode(self, group: dict, where: str) -> None:
        """MSAM needs momentum: a group whose ``momentum`` hyperparameter is 0 has none to perturb along."""
        if isinstance(self.mode, MSAM) and "momentum" in group and group["momentum"] == 0:
            raise ValueError(f"mode=MSAM() perturbs along the base optimizer's momentum, and {where} has momentum=0: "
                             "set momentum > 0 (e.g. momentum=0.9), use Adam/AdamW, or choose another mode")

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict``, plus ``"funcsam"``: ``{"steps_taken": int,
        "looksam_g_v": {parameter index: tensor}}`` (the indices of ``"state"``), and with
        ``mode=AESAM(...)`` ``"adaptive": {"mean", "var", "count", "take_next"}`` (0-dim tensors)."""
        state_dict = super().state_dict()
        index = {p: i for i, p in enumerate(self._all_params())}
        state_dict["funcsam"] = {"steps_taken": self.steps_taken,
                                 "looksam_g_v": {index[p]: g_v for p, g_v in self._looksam_g_v.items() if p in index}}
        if self._adaptive is not None:
            state_dict["funcsam"]["adaptive"] = self._adaptive._asdict()
        return state_dict

    def _restore_mode_state(self, mode_state: _ModeState) -> None:
        """Install what :meth:`_saved_mode_state` checked (after the base state loaded)."""
        self.steps_taken, self._looksam_g_v = mode_state.steps_taken, mode_state.looksam_g_v
        if isinstance(self.mode, AESAM):
            fresh = mode_state.adaptive is None
            self._adaptive = self._fresh_adaptive_statistics() if fresh else mode_state.adaptive
        self._first_gradient_norm = None

    def _saved_mode_state(self, state_dict: dict) -> _ModeState:
        """``(steps_taken, g_v by parameter, AESAM's statistics)`` from a state dict, checked before
        anything is loaded; a state dict without them (from torch.optim, or another mode) starts
        over at step 0 with no g_v and fresh statistics."""
        saved = state_dict.get("funcsam") if isinstance(state_dict, dict) else None
        if saved is None:
            return _ModeState(0, {}, None)
        steps = saved.get("steps_taken") if isinstance(saved, dict) else None
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"state_dict['funcsam'] must hold steps_taken, an int >= 0 (from optimizer.state_dict()), "
                             f"got {saved!r:.200}")
        params, g_v = self._all_params(), {}
        for index, value in saved.get("looksam_g_v", {}).items():
            fits = isinstance(index, int) and 0 <= index < len(params) and isinstance(value, torch.Tensor)
            if not fits or value.shape != params[index].shape:
                raise ValueError(f"state_dict['funcsam']['looksam_g_v'] entry {index!r} does not fit a parameter of "
                                 "this optimizer: the state belongs to another model")
            g_v[params[index]] = value.to(device=params[index].device, dtype=params[index].dtype)
        adaptive = saved.get("adaptive")
        if isinstance(self.mode, AESAM) and adaptive is not None:
            adaptive = _checked_adaptive_statistics(adaptive, params[0].device)
        else:
            adaptive = None
        return _ModeState(steps, g_v, adaptive)

    def _all_params(self) -> list:
        return [p for group in self.param_groups for p in group["params"]]

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
        # SAM-ON (funcsam.sam_on.sam_on_param_groups): a group with perturb=False is neither perturbed
        # nor part of the norm; it still descends with its gradient at w + e.
        perturbs = [_perturbs(group) for group, _ in groups]
        if not any(perturbs):
            raise ValueError("every param group with a gradient has perturb=False: nothing would be perturbed. "
                             "Set perturb=True on the groups to perturb (funcsam.sam_on.sam_on_param_groups)")
        params = [p for _, group_params in groups for p in group_params]
        grads = _unscaled_grads(params, _inverse_scale(grad_scaler))
        directions, normed, start = [], [], 0
        for (group, group_params), perturbed in zip(groups, perturbs):
            end = start + len(group_params)
            direction = None
            if perturbed:
                direction, group_normed = ascent_direction(grads[start:end], group_params,
                                                           adaptive=group["adaptive"], eta=self.eta)
                normed += group_normed
            directions.append(direction)
            start = end
        grad_norm = global_norm(normed)
        del normed
        self._perturbed = _Perturbed(groups, params, clone_all(params), grad_norm, _clone_buffers(self.model),
                                     pre_step_buffers)
        for (group, group_params), direction in zip(groups, directions):
            if direction is not None:
                torch._foreach_add_(group_params, sam_perturbation(direction, grad_norm, group["rho"], self.eps))

    def _come_back(self) -> None:
        """Undo a ``first_step`` whose second half will not come: params (and buffers) as before it."""
        perturbed, self._perturbed = self._perturbed, None
        self._first_grads = self._first_gradient_norm = None
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
        if isinstance(self.mode, AESAM):
            self._observe(finite)
        self.steps_taken += 1

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


def _checked_adaptive_statistics(saved: Any, device: torch.device) -> _AdaptiveStatistics:
    """AESAM's saved statistics, refused (ValueError) unless they are what ``state_dict()`` writes."""
    fields = _AdaptiveStatistics._fields
    fits = isinstance(saved, dict) and set(saved) == set(fields) and all(
        isinstance(saved[name], torch.Tensor) and saved[name].dim() == 0 and saved[name].dtype == dtype
        for name, dtype in zip(fields, _ADAPTIVE_DTYPES))
    if fits:
        statistics = _AdaptiveStatistics(*(saved[name].to(device=device, copy=True) for name in fields))
        # Read once, at load time: the values must be statistics a run can have.
        fits = (bool(statistics.mean.isfinite()) and bool(statistics.var.isfinite()) and float(statistics.var) >= 0
                and int(statistics.count) >= 0)
    if not fits:
        raise ValueError("state_dict['funcsam']['adaptive'] must hold AESAM's statistics as optimizer.state_dict() "
                         "writes them: 0-dim tensors mean and var (float32, finite, var >= 0), count (int64, >= 0) "
                         f"and take_next (bool); got {saved!r:.200}")
    return statistics


def _hold(grads: list, applied: list) -> None:
    """Write the gradient to apply into ``grads`` (the ``p.grad`` tensors) unless it is that list."""
    if applied is not grads:
        torch._foreach_copy_(grads, applied)


def _perturbs(group: dict) -> bool:
    """A group's ``perturb`` flag (SAM-ON, funcsam.sam_on): False leaves it unperturbed and out of the norm."""
    flag = group.get("perturb", True)
    if not isinstance(flag, bool):
        raise TypeError(f"a param group's perturb must be a bool (False: SAM-ON leaves it unperturbed), got {flag!r}")
    return flag


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
