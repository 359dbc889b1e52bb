"""The shell every stateful SAM optimizer shares: one SAM step of any mode through the mode's hooks.

:class:`SAMOptimizer` is a ``torch.optim.Optimizer`` over the formulas the pure step uses
(:mod:`funcsam.modes`, :mod:`funcsam.perturbation`, :mod:`funcsam.clipping`). ``step(closure)``,
with ``take = mode.takes_sam(steps_taken, own)`` (own: the mode's own state, :mod:`funcsam.mode_state`)::

    take, mode.ascent == "momentum"   one pass at w - e, e from the base's momentum (MSAM); g there
    take, some rho != 0               g at w, climb to w + e, g_sam there, back to w   (funcsam.two_halves)
    otherwise                         g at w (one pass)
    d, own = mode.direction(StepGradients(g, g_sam, ||g||), own, eps);  own = mode.observe(...)
    base step with d (clipped with max_grad_norm), skipped where a gradient was non-finite

The modes whose ``two_halves`` is True (SAM, GSAM) also take ``first_step``/``second_step`` around
the caller's own backward passes. fp16: :mod:`funcsam.grad_scaler`; BatchNorm: :mod:`funcsam.buffers`;
DistributedDataParallel, ``sam_sync="global"|"local"``: :mod:`funcsam.ddp`.
A subclass says how to descend (``_descend``) and where the momentum is (``_momentum``):
:class:`funcsam.SAM` over any ``torch.optim`` optimizer, :class:`funcsam.SAMSGD` over ``funcsam.sgd``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from . import buffers, mode_state, sharding
from .clipping import clip_by_global_norm
from .ddp import Replicas
from .grad_scaler import inverse_scale, record_found_inf, unscaled_grads
from .hyperparameters import check_sam_options, is_static_zero
from .modes.protocol import StepGradients, check_mode
from .param_groups import all_params, check_group, check_group_fits_mode, gradients_seen, positions, with_gradients
from .tree import Tensor, clone_all, global_norm
from .two_halves import Perturbed, TwoHalves, group_perturbation


class SAMOptimizer(TwoHalves, torch.optim.Optimizer):
    """The SAM machinery of :class:`funcsam.SAM` and :class:`funcsam.SAMSGD` (module docstring).

    Each param group carries ``rho`` and ``adaptive`` (and ``perturb`` for SAM-ON); the norm of the
    perturbation is global over all groups. After a step ``p.grad`` holds the (unscaled, unclipped)
    gradient the base step applied (g_sam; GSAM's d; LookSAM's estimate), ``last_step_finite`` is a
    0-dim bool tensor (False: a gradient was non-finite and the step was skipped, params and state
    unchanged) and ``steps_taken`` counts the steps (skipped ones too: the index a schedule reads).
    ``state_dict()["funcsam"]`` holds ``steps_taken`` and the mode's own state, so a resumed run
    takes the same steps bit for bit. With a DDP ``model``, ``sam_sync`` says whether the replicas
    perturb with the averaged gradient ("global") or each with its own ("local", :mod:`funcsam.ddp`).
    """

    def __init__(self, params: Iterable, defaults: dict, *, eta: float, eps: float, max_grad_norm: float | None,
                 model: torch.nn.Module | None, mode: Any = None, sam_sync: str = "global"):
        check_sam_options(eta=eta, eps=eps, max_grad_norm=max_grad_norm)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self._replicas = Replicas(model, sam_sync)
        self.eta, self.eps, self.max_grad_norm, self.model = eta, eps, max_grad_norm, model
        self.sam_sync = sam_sync
        self.mode = check_mode(mode)
        self.steps_taken = 0
        self.last_step_finite: Tensor | None = None
        self._perturbed: Perturbed | None = None
        self._gradients_seen: dict = {}
        super().__init__(params, defaults)
        sharding.refuse_fsdp1(model, self._all_params())
        sharding.params_layout(self._all_params())  # a mix of sharded and plain params is refused now
        self._mode_state = self.mode.init(self._all_params())

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, grad_scaler: torch.amp.GradScaler | None = None):
        """One step of the mode through ``closure`` (which zeroes the gradients, computes the loss,
        calls ``backward`` and returns the loss); returns the loss at w (at w - e for MSAM), or None
        when the gradient at w was already there (see :meth:`_needs_first_gradient`).

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
        with self._over_shards():
            return self._step(closure, grad_scaler)

    def _step(self, closure: Callable[[], Tensor], grad_scaler: torch.amp.GradScaler | None):
        # AESAM decides from its state: a host read of a 0-dim bool (free on the CPU, a sync on a GPU).
        take = self.mode.takes_sam(self.steps_taken, self._mode_state)
        if take and self.mode.ascent == "momentum":
            momenta = self._momenta()
            if momenta:
                return self._momentum_step(closure, grad_scaler, momenta)
            take = False  # no momentum yet: m = 0 gives e = 0, the base step
        loss, pre_step_buffers = None, None
        # Under sam_sync="local" a SAM step's first pass is each replica's own (DDP's no_sync()).
        two_passes, ran_local = take and not all(is_static_zero(group["rho"]) for group in self.param_groups), False
        if self._needs_first_gradient():
            pre_step_buffers = buffers.snapshot(self.model)
            with self._replicas.first_pass(two_passes):
                loss = _evaluate(closure)
            ran_local = two_passes and self._replicas.local
        groups = with_gradients(self.param_groups, "the closure")
        if not take or all(is_static_zero(group["rho"]) for group, _ in groups):
            if self._replicas.first_gradient_is_local(ran_local):  # one pass: DDP's average after all
                params = [p for _, group_params in groups for p in group_params]
                torch._foreach_copy_([p.grad for p in params], self._replicas.reduce([p.grad for p in params]))
            self._one_pass(groups, pre_step_buffers, grad_scaler)
            return loss
        self._climb(groups, grad_scaler, pre_step_buffers, keep_grads=False, ran_local=ran_local)
        # As davda54's first_step(zero_grad=True): a closure that does not zero the gradients itself
        # would otherwise add the gradient at w + e to the one at w.
        self.zero_grad(set_to_none=True)
        try:
            _evaluate(closure)
        except BaseException:
            self._come_back()
            raise
        self._second_half(grad_scaler)
        return loss

    # --- the passes -----------------------------------------------------------------------------

    def _climb(self, groups: list, grad_scaler, pre_step_buffers: list | None, *, keep_grads: bool,
               ran_local: bool = False) -> None:
        """:class:`TwoHalves`'s climb, then what DDP needs (:mod:`funcsam.ddp`): the first gradient's
        synchronisation checked against ``sam_sync``, and under "local" the hook that spreads a
        non-finite ||g_r|| and the average of g where the mode reads it."""
        super()._climb(groups, grad_scaler, pre_step_buffers, keep_grads=keep_grads)
        try:
            self._replicas.check_first_gradient(self._replicas.first_gradient_is_local(ran_local))
            self._perturbed = self._replicas.after_climb(self._perturbed, self.mode.uses_first_gradient)
        except BaseException:
            self._come_back()
            raise

    def _come_back(self) -> None:
        self._replicas.remove_hook()
        super()._come_back()

    def _second_half(self, grad_scaler) -> None:
        self._replicas.remove_hook()
        if self._perturbed is not None:
            try:
                self._replicas.check_sam_gradient()
            except BaseException:
                self._come_back()
                raise
        super()._second_half(grad_scaler)

    def _one_pass(self, groups: list, pre_step_buffers: list | None, grad_scaler) -> None:
        """The mode's one-pass step with the gradient in p.grad (the base step; LookSAM's estimate; MSAM's)."""
        params = [p for _, group_params in groups for p in group_params]
        grads = unscaled_grads(params, inverse_scale(grad_scaler))
        grad_norm = global_norm(grads)
        self._finish(groups, StepGradients(grads, None, grad_norm), torch.isfinite(grad_norm),
                     clone_all(sharding.local_views(params)), pre_step_buffers, grad_scaler, held_norm=grad_norm)

    def _momentum_step(self, closure, grad_scaler, momenta: dict):
        """MSAM: one pass at w - e, e = rho * m / (||m|| + eps) (ASAM: rho * T^2 m / (||T m|| + eps)) over
        the groups that perturb, back to w exactly, and the one-pass step with that gradient. The
        pass's BatchNorm updates are kept (there is no pass at w); a skipped step undoes them."""
        groups = [(group, [p for p in group["params"] if p in momenta]) for group in self.param_groups]
        groups = [(group, params) for group, params in groups if params]
        vectors = sharding.local_views([momenta[p] for _, params in groups for p in params])
        perturbed, ascent, _ = group_perturbation(groups, vectors, eta=self.eta, eps=self.eps, having="momentum",
                                                  rho_scale=self.mode.rho_scale)
        pre_step_buffers, unperturbed = buffers.snapshot(self.model), clone_all(perturbed)
        try:
            torch._foreach_sub_(perturbed, ascent)
            del ascent
            self.zero_grad(set_to_none=True)  # else the closure could add g(w - e) to a gradient at w
            loss = _evaluate(closure)
        except BaseException:
            torch._foreach_copy_(perturbed, unperturbed)
            buffers.restore(self.model, pre_step_buffers)
            raise
        torch._foreach_copy_(perturbed, unperturbed)
        del unperturbed
        self._one_pass(with_gradients(self.param_groups, "the closure"), pre_step_buffers, grad_scaler)
        return loss

    def _finish(self, groups: list, gradients: StepGradients, finite: Tensor, unperturbed: list,
                pre_step_buffers: list | None, grad_scaler, *, held_norm: Tensor | None = None) -> None:
        """The mode's direction and observation, then the base step with it (held in p.grad, clipped).
        ``held_norm``: the global norm of the gradient p.grad holds, which clipping reuses when the
        direction is that gradient (SAM's g_sam, the base step's g)."""
        params = [p for _, group_params in groups for p in group_params]
        indices = positions(self.param_groups, params) if self.mode.per_parameter else None
        own = mode_state.gather(self.mode, self._mode_state, indices)
        direction, own_after = self.mode.direction(gradients, own, self.eps)
        own_after = self.mode.observe(own, own_after, gradients, finite)
        held = gradients.first if gradients.sam is None else gradients.sam  # the p.grad tensors
        if direction is not held:
            torch._foreach_copy_(held, direction)
            held_norm = None
        applied = held if self.max_grad_norm is None else clip_by_global_norm(held, self.max_grad_norm, held_norm)[0]
        try:
            self._descend(groups, applied, finite, unperturbed)
        except BaseException:
            torch._foreach_copy_(sharding.local_views(params), unperturbed)
            raise
        buffers.keep_if(finite, self.model, pre_step_buffers)
        record_found_inf(grad_scaler, self, finite)
        self.last_step_finite = finite
        self._opt_called = True  # what a torch.optim.lr_scheduler checks for before its own step
        self._gradients_seen = gradients_seen(params)
        self._mode_state = mode_state.scatter(self.mode, self._mode_state, indices, own_after)
        self.steps_taken += 1

    # --- param groups, checkpoints --------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, rejecting a bad ``rho``/``lr`` first."""
        merged = {**getattr(self, "defaults", {}), **param_group}
        self._check_group(merged)
        check_group_fits_mode(self.mode, merged, "the param group")
        super().add_param_group(param_group)
        self._added_params(self.param_groups[-1]["params"])

    def _added_params(self, params: list) -> None:
        """Give the mode's own state entries for the params of a group added after construction."""
        if "_mode_state" in self.__dict__:
            self._mode_state = mode_state.extended(self.mode, self._mode_state, params)

    def _check_group(self, group: dict) -> None:
        check_group(group)

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict``, plus ``"funcsam"``: ``{"steps_taken": int,
        mode.checkpoint_key: the mode's own state}`` (:mod:`funcsam.mode_state`; no key for a mode without)."""
        state_dict = super().state_dict()
        state_dict["funcsam"] = mode_state.funcsam_entry(self.mode, self.steps_taken, self._mode_state)
        return state_dict

    def _saved_mode_state(self, state_dict: dict) -> tuple[int, Any]:
        """``(steps_taken, own state)`` from a state dict, checked before anything is loaded."""
        return mode_state.checked_funcsam_entry(self.mode, state_dict, self._all_params())

    def _restore_mode_state(self, saved: tuple[int, Any]) -> None:
        """Install what :meth:`_saved_mode_state` checked (after the base state loaded)."""
        self.steps_taken, self._mode_state = saved

    def _all_params(self) -> list:
        return all_params(self.param_groups)

    def _over_shards(self):
        """The context in which a step's reductions are global over the mesh when the params are
        sharded (FSDP2, :mod:`funcsam.sharding`); a no-op for plain params."""
        return sharding.over_shards(sharding.params_layout(self._all_params()))

    def _momenta(self) -> dict:
        """The base optimizer's momentum by parameter, where it has one yet (MSAM's direction)."""
        momenta = {}
        for index, group in enumerate(self.param_groups):
            check_group_fits_mode(self.mode, group, f"param group {index}")
            momenta.update((p, m) for p in group["params"] if (m := self._momentum(p)) is not None)
        return momenta

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


def _evaluate(closure: Callable[[], Tensor]) -> Tensor:
    with torch.enable_grad():
        return closure()
