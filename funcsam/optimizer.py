"""Stateful SAM optimizers: :class:`SAM` over any ``torch.optim`` optimizer, and :class:`SAMSGD`.

``SAM`` is a drop-in for davda54/sam (change the import)::

    optimizer = funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3, weight_decay=0.05)
    criterion(model(x), y).backward(); optimizer.first_step(zero_grad=True)
    criterion(model(x), y).backward(); optimizer.second_step(zero_grad=True)

``SAMSGD`` is a drop-in for sam.pytorch, SAM over torch.optim.SGD computed with the pure
``funcsam.sgd`` update that :func:`funcsam.sam_step` uses::

    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05)

    def closure():
        optimizer.zero_grad()
        loss = criterion(model(inputs), targets)
        loss.backward()
        return loss

    loss = optimizer.step(closure)        # the loss at w, from the first call of the closure

Both take ``mode=``, the same mode objects as :func:`funcsam.sam_step` (:mod:`funcsam.modes`)::

    funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, rho=0.05, mode=funcsam.every(5))
    funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3, mode=funcsam.GSAM(alpha=0.2))
    funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, rho=0.05, mode=funcsam.AESAM(total_steps=20_000))
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch

from .adapter import SAMOptimizer
from .base import SGD, MomentumState, check_base, check_sgd_hyperparameters
from .hyperparameters import check_scalar
from .param_groups import check_group_fits_mode, has_new_gradient
from .sharding import check_state_sharding, local_views, stored_into
from .tree import Tensor, clone_all, picker, select

# Group keys that select an implementation rather than define the update: a state dict may lack them.
_IMPLEMENTATION_KEYS = {"foreach", "fused", "capturable", "differentiable", "maximize", "decoupled_weight_decay"}


class SAM(SAMOptimizer):
    """SAM over any ``torch.optim.Optimizer`` class; davda54/sam's interface, plus what it lacks.

    Args:
        params: parameters or param groups. Each group may set its own ``rho`` and ``adaptive`` besides
            the base optimizer's hyperparameters; the gradient norm is global over all groups.
        base_optimizer: the optimizer class (``torch.optim.AdamW``, ``torch.optim.SGD``, a third
            party's), built here as ``base_optimizer(self.param_groups, **base_kwargs)``.
        rho: neighbourhood radius (default 0.05).
        adaptive: ASAM, e = rho * T^2 g / (||T g|| + eps) with T = |w| + eta (use a larger rho, e.g. 2).
        eta: ASAM's offset (default 0).
        eps: added to the gradient norm (default 1e-12).
        max_grad_norm: if given, the SAM gradient is clipped to this global norm before the base step.
        model: if given, its buffers (BatchNorm running statistics) are put back to their first-pass
            values after the second pass; in the closure style a skipped step also restores them to
            their values before the step. (In the first/second-step style the first forward ran before
            the optimizer saw it, so a skipped step keeps that forward's buffer updates.) MSAM's one
            pass is at w + e: its buffer updates are kept.
        mode: None (SAM on every step), ``funcsam.every(k)``, ``funcsam.late(start_step)``,
            ``funcsam.LookSAM(k, alpha)``, ``funcsam.MSAM()``, ``funcsam.GSAM(alpha)`` or
            ``funcsam.AESAM(total_steps, delta)`` (:mod:`funcsam.modes`). MSAM perturbs along
            ``state["momentum_buffer"]`` (torch.optim.SGD with momentum > 0) or ``state["exp_avg"]``
            (Adam, AdamW); a base optimizer with neither is refused.
        sam_sync: with ``model=ddp_model`` (``torch.nn.parallel.DistributedDataParallel``): "global"
            (default; DDP averages both passes: one process on the global batch) or "local" (the
            first pass under ``ddp_model.no_sync()``: each replica perturbs with its own gradient,
            the paper's m-sharpness with m = the per-replica batch; :mod:`funcsam.ddp`). In the
            first/second-step style run the first backward inside ``with ddp_model.no_sync():``
            yourself; a backward whose synchronisation contradicts ``sam_sync`` is refused.
        **base_kwargs: the base optimizer's own arguments (``lr``, ``weight_decay``, ``betas``, ...).

    ``param_groups`` and ``state`` are the base optimizer's (``.base_optimizer``), so a
    ``torch.optim.lr_scheduler`` works on either, and ``state_dict()`` holds the base state and each
    group's ``rho``/``adaptive``. ``step(closure)`` follows davda54: with the gradient at w already
    in ``.grad`` (a backward since the last step), it perturbs, calls the closure once for the
    gradient at w + e, and descends; with no new gradient (none at all, or only what the last step
    left, as in a sam.pytorch loop that zeroes inside its closure) it first calls the closure for the
    gradient at w, as ``SAMSGD.step`` does, and returns that loss.

    Skipping non-finite steps: on a GPU the base step runs and its result is discarded with
    ``torch.where`` (no host sync) once every parameter has state on the device; before that, and
    with state kept on the host (torch's Adam keeps its ``step`` counts on the CPU unless
    ``capturable=True``), the verdict is read on the host and the base step not called. On the CPU
    the verdict is always read (it costs nothing there).
    """

    def __init__(self, params: Iterable, base_optimizer: type, rho: float = 0.05, *, adaptive: bool = False,
                 eta: float = 0.0, eps: float = 1e-12, max_grad_norm: float | None = None,
                 model: torch.nn.Module | None = None, mode: Any = None, sam_sync: str = "global", **base_kwargs):
        _check_base_optimizer_class(base_optimizer)
        for name in ("lr", "weight_decay"):
            if name in base_kwargs and not isinstance(base_kwargs[name], torch.Tensor):
                check_scalar(name, base_kwargs[name])
        defaults = dict(rho=rho, adaptive=adaptive, **base_kwargs)
        super().__init__(params, defaults, eta=eta, eps=eps, max_grad_norm=max_grad_norm, model=model, mode=mode,
                         sam_sync=sam_sync)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        for index, group in enumerate(self.param_groups):  # now with the base optimizer's defaults (momentum=0)
            check_group_fits_mode(self.mode, group, f"param group {index}")

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the group goes to the base optimizer too."""
        if "base_optimizer" not in self.__dict__:  # during __init__
            return super().add_param_group(param_group)
        self._check_group({**self.defaults, **param_group})
        check_group_fits_mode(self.mode, {**self.defaults, **param_group}, "the param group")
        param_group.setdefault("rho", self.defaults["rho"])
        param_group.setdefault("adaptive", self.defaults["adaptive"])
        self.base_optimizer.add_param_group(param_group)
        self._added_params(self.param_groups[-1]["params"])

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, refusing a state dict of another kind of optimizer
        (its groups lack this base optimizer's hyperparameters) or with a bad ``lr``/``rho``; also
        restores ``steps_taken`` and the mode's own state (see :meth:`state_dict`)."""
        groups = _checked_groups(state_dict, self.param_groups)
        check_state_sharding(state_dict, self._all_params())
        mode_state = self._saved_mode_state(state_dict)
        needed = {key for key, value in self.base_optimizer.defaults.items()
                  if key not in _IMPLEMENTATION_KEYS and not isinstance(value, bool)}
        for index, group in enumerate(groups):
            lacking = sorted(needed - set(group))
            if lacking:
                raise ValueError(
                    f"state_dict's param group {index} lacks {', '.join(lacking)}: it is not a state of "
                    f"{type(self.base_optimizer).__name__}; load a state saved by this kind of optimizer"
                )
            self._check_group({"rho": self.defaults["rho"], "adaptive": self.defaults["adaptive"], **group})
        self.base_optimizer.load_state_dict({key: value for key, value in state_dict.items() if key != "funcsam"})
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])
        self._restore_mode_state(mode_state)

    def _needs_first_gradient(self) -> bool:
        return not has_new_gradient(self.param_groups, self._gradients_seen)

    def _momentum(self, p: Tensor) -> Tensor | None:
        state = self.state.get(p)
        if not state:
            return None
        for key in ("momentum_buffer", "exp_avg"):
            if state.get(key) is not None:
                return state[key]
        raise RuntimeError(
            f"mode=MSAM() perturbs along the base optimizer's momentum (state['momentum_buffer'] of torch.optim.SGD, "
            f"state['exp_avg'] of Adam and AdamW), and {type(self.base_optimizer).__name__} keeps neither (its state "
            f"holds {', '.join(sorted(map(str, state)))}): use a base optimizer with momentum, or another mode"
        )

    def _descend(self, groups: list, grads: list, finite: Tensor, unperturbed: list) -> None:
        params = [p for _, group_params in groups for p in group_params]
        held = local_views([p.grad for p in params])
        if any(g is not h for g, h in zip(grads, held)):  # clipped: the base optimizer reads p.grad
            torch._foreach_copy_(held, grads)
        state = self._state_tensors(params, finite.device)
        if finite.device.type == "cpu" or state is None:
            if bool(finite):  # a host read: free on the CPU, one sync on a GPU
                self.base_optimizer.step()
            return
        before = clone_all(local_views(state))
        self.base_optimizer.step()
        after = local_views(self._state_tensors(params, finite.device))
        shards = local_views(params)
        torch._foreach_copy_(shards, select(finite, shards, unperturbed))
        torch._foreach_copy_(after, select(finite, after, before))

    def _state_tensors(self, params: list, device: torch.device) -> list | None:
        """Every state value of ``params``, or None unless all exist and are tensors on ``device``."""
        values = [value for p in params for value in self.state.get(p, {}).values()]
        ready = all(self.state.get(p) for p in params) and all(
            isinstance(value, torch.Tensor) and value.device == device for value in values
        )
        return values if ready else None


class SAMSGD(SAMOptimizer):
    """SAM with torch.optim.SGD as the base optimizer; ``step`` takes a closure and calls it twice.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``. Each group may set
            its own ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``nesterov``, ``rho`` and
            ``adaptive``; the gradient norm that normalises the perturbation is global over all groups.
        lr: learning rate, a float or a 0-dim tensor (torch.optim.SGD's, as the four below).
        momentum: momentum factor (default 0).
        dampening: dampening of the momentum (default 0).
        weight_decay: L2 penalty added to the gradient (default 0).
        nesterov: Nesterov momentum (default False).
        rho: neighbourhood radius (default 0.05); 0 in every group gives plain SGD with one pass.
        adaptive: ASAM, e = rho * T^2 g / (||T g|| + eps) with T = |w| + eta.
        eta: ASAM's offset (default 0).
        eps: added to the gradient norm (default 1e-12); a zero gradient gives e = 0.
        max_grad_norm: if given, the SAM gradient is clipped to this global norm before the update.
        model: if given, its buffers (BatchNorm running statistics) are restored after the second
            pass, so they hold the statistics of the unperturbed pass only, as with ``sam_step``, and
            a skipped step restores them to their values before the step. Without it, the perturbed
            pass updates them too (as in ``sam.pytorch``). MSAM's one pass is at w + e: its buffer
            updates are kept.
        mode: None (SAM on every step), ``funcsam.every(k)``, ``funcsam.late(start_step)``,
            ``funcsam.LookSAM(k, alpha)``, ``funcsam.MSAM()`` (needs ``momentum > 0``; perturbs along
            the momentum buffer), ``funcsam.GSAM(alpha)`` or ``funcsam.AESAM(total_steps, delta)``.
        sam_sync: with ``model=ddp_model`` (DistributedDataParallel): "global" (default, one process
            on the global batch) or "local" (each replica perturbs with its own gradient), as in
            :class:`funcsam.SAM`.

    After ``step``, ``p.grad`` holds the (unscaled) SAM gradient and ``last_step_finite`` is a
    0-dim bool tensor: False when a gradient was non-finite and the step was skipped. The update is
    ``funcsam.sgd``'s pure one, selected with ``torch.where``: skipping never syncs with the host.
    ``first_step``/``second_step`` work as in :class:`funcsam.SAM`.
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
        mode: Any = None,
        sam_sync: str = "global",
    ):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, rho=rho, adaptive=adaptive)
        self._check_group(defaults)
        super().__init__(params, defaults, eta=eta, eps=eps, max_grad_norm=max_grad_norm, model=model, mode=mode,
                         sam_sync=sam_sync)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_sgd_hyperparameters(momentum=group["momentum"], dampening=group["dampening"],
                                  weight_decay=group["weight_decay"], nesterov=group["nesterov"])

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``; a ``torch.optim.SGD`` checkpoint loads too,
        its groups taking this optimizer's ``rho`` (and any other missing key) from the constructor.
        A state of another optimizer (Adam's moments), with bad hyperparameters, or with a momentum
        buffer of the wrong shape is refused and nothing is changed. ``steps_taken`` and the mode's own
        state are restored too (see :meth:`state_dict`)."""
        groups = _checked_groups(state_dict, self.param_groups)
        check_state_sharding(state_dict, self._all_params())
        mode_state = self._saved_mode_state(state_dict)
        for index, group in enumerate(groups):
            self._check_group({**self.defaults, **group})
        params = {i: p for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        for key, state in state_dict.get("state", {}).items():
            foreign = sorted(set(state) - {"momentum_buffer", "step"})
            if foreign:
                raise ValueError(f"state_dict holds {', '.join(foreign)} for parameter {key}: it is the state of "
                                 "another optimizer (SGD's is momentum_buffer); load a SAMSGD or torch.optim.SGD state")
            buffer, param = state.get("momentum_buffer"), params.get(key)
            if buffer is not None and param is not None and buffer.shape != param.shape:
                raise ValueError(f"state_dict's momentum_buffer for parameter {key} has shape {tuple(buffer.shape)}, "
                                 f"the parameter {tuple(param.shape)}: this state belongs to another model")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._restore_mode_state(mode_state)

    def _momentum(self, p: Tensor) -> Tensor | None:
        return self.state.get(p, {}).get("momentum_buffer")

    def _descend(self, groups: list, grads: list, finite: Tensor, unperturbed: list) -> None:
        start = 0
        for group, params in groups:
            group_grads = grads[start:start + len(params)]
            start += len(params)
            self._descend_group(group, params, group_grads, finite)

    def _descend_group(self, group: dict, params: list, grads: list, finite: Tensor) -> None:
        """``funcsam.sgd``'s update of one group, applied only where ``finite`` (no host sync)."""
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
        base = SGD(momentum, group["dampening"], group["weight_decay"], group["nesterov"])
        shards, buffer_shards = local_views(params), local_views(buffers)  # the tensors themselves unless sharded
        stepped, new_state = base.update(shards, grads, MomentumState(buffer_shards, states[0]["step"]), group["lr"])
        keep = picker(finite)  # on the CPU no select copy of params and momenta beside the held w
        torch._foreach_copy_(shards, keep(stepped, shards))
        del stepped
        if momentum != 0:
            for state, old, buffer in zip(states, buffers, keep(new_state.momentum_buffer, buffer_shards)):
                state["momentum_buffer"] = stored_into(old, buffer)
        torch._foreach_add_([state["step"] for state in states], finite.to(torch.int64))


def _check_base_optimizer_class(base_optimizer) -> None:
    if isinstance(base_optimizer, torch.optim.Optimizer):
        raise TypeError(f"base_optimizer must be the optimizer class, e.g. torch.optim.{type(base_optimizer).__name__}, "
                        "not an instance: SAM builds it over its own param groups")
    try:
        check_base(base_optimizer)
    except TypeError:
        pass
    else:
        raise TypeError("base_optimizer must be a torch.optim.Optimizer class such as torch.optim.AdamW; "
                        "funcsam.sgd()/adamw() are pure parts for funcsam.sam_step(..., base=...)")
    if not (inspect.isclass(base_optimizer) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class such as torch.optim.AdamW, "
                        f"got {base_optimizer!r}")


def _checked_groups(state_dict, param_groups: list) -> list:
    """The saved param groups, checked to be a state dict that fits ``param_groups``."""
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError("state_dict must be an optimizer state dict with 'state' and 'param_groups' "
                         "(from optimizer.state_dict())")
    groups = state_dict["param_groups"]
    if len(groups) != len(param_groups) or any(
        len(saved["params"]) != len(group["params"]) for saved, group in zip(groups, param_groups)
    ):
        raise ValueError("state_dict has param groups of other sizes than this optimizer's: it belongs to "
                         "another model or another grouping of its parameters")
    return groups
