"""What a SAM mode is: a small immutable object whose hooks one pipeline calls, in every API.

A step of any mode, over flat leaf lists (``g = grad L(w)``; ``g_sam = grad L(w + e)`` on SAM steps)::

    take = mode.takes_sam(step, state)            host side, a Python bool: two passes, or one
    e    = rho * mode.rho_scale * <ascent> / ||<ascent>||     <ascent> is g, or the base's momentum (mode.ascent)
    d, s = mode.direction(gradients, s, eps)      what the base applies: g_sam, GSAM's d, LookSAM's estimate
    s    = mode.observe(s_before, s, gradients, finite)      AE-SAM's statistics; a skipped step keeps s
    w    = base.update(w, d)

``s`` is the mode's own state (:meth:`Mode.init`: a NamedTuple of flat fields, or None). The pure
step carries it beside the base optimizer's state in the mode's ``state_type`` (``LookSAMState``,
``AdaptiveState``: the base state first, then the own fields, per-parameter ones as pytrees shaped
like params); the optimizers keep it themselves and save it in ``state_dict()["funcsam"]``.

The pipeline never asks which mode it runs: it reads the class attributes below and calls the hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from ..hyperparameters import check_int
from ..tree import PyTree, Tensor, flatten, global_norm, same_structure, select, unflatten

__all__ = ["FullSAM", "Mode", "StepGradients", "check_mode", "check_step"]


class StepGradients(NamedTuple):
    """What a mode sees of a step: the gradients, reduced across replicas and unscaled.

    Fields:
        first: g, the gradient at w (at the step's one point for MSAM); None on a SAM step when the
            mode does not use it (``uses_first_gradient`` False) and it was never reduced.
        sam: g_sam, the gradient at w + e on a SAM step; None on a one-pass step.
        first_norm: ||g|| (plain, also under ASAM) where the pipeline has it, else None
            (:meth:`Mode.first_norm` computes it on demand).
    """

    first: list | None
    sam: list | None
    first_norm: Tensor | None


@dataclass(frozen=True)
class Mode:
    """Full SAM, and the defaults every mode starts from. Subclasses override what they change.

    The pipelines read its class attributes, never an ``isinstance``.

    Attributes:
        ascent: ``"gradient"`` (SAM's e from g, two passes) or ``"momentum"`` (MSAM: e from the
            base's momentum before the step, one pass at w + e).
        uses_first_gradient: ``direction``/``observe`` read g on SAM steps (under
            ``sam_sync="local"`` or m-sharpness with ``grad_reduce``, g is then reduced as well).
        two_halves: fits ``first_step``/``second_step`` (two passes on every step).
        state_type: the pure step's state NamedTuple (base state first), or None (the base's own).
        own_type: the mode's own state NamedTuple, or None.
        per_parameter: the fields of ``own_type`` that hold one tensor per parameter.
        checkpoint_key: the key of the own state in an optimizer's ``state_dict()["funcsam"]``.
        rho_scale: the factor on rho wherever a step perturbs (1; ``every(k, scale_rho=True)``: k),
            read by the pure step, the optimizers' climb and MSAM's ascent alike.
        example: how to build one, for messages (``"funcsam.LookSAM(k=5, alpha=0.7)"``).
    """

    ascent: ClassVar[str] = "gradient"
    uses_first_gradient: ClassVar[bool] = False
    two_halves: ClassVar[bool] = True
    state_type: ClassVar[Any] = None
    own_type: ClassVar[Any] = None
    per_parameter: ClassVar[tuple[str, ...]] = ()
    checkpoint_key: ClassVar[str | None] = None
    rho_scale: ClassVar[float] = 1.0
    example: ClassVar[str] = "funcsam.FullSAM()"

    # --- host side ------------------------------------------------------------------------------

    def takes_sam(self, step: int, state: Any = None) -> bool:
        """Whether the 0-based step ``step`` takes the SAM gradient (two passes); a Python bool.
        ``state`` is the mode's state (the pure step's, or the optimizer's own), for modes that decide from it."""
        return True

    def check_momentum(self, has_momentum: bool, where: str) -> None:
        """Refuse a base optimizer the mode cannot work with (MSAM: one without momentum)."""

    # --- device side, pure ----------------------------------------------------------------------

    def init(self, params: list) -> Any:
        """The mode's own state for flat ``params`` (None when it has none)."""
        return None

    def direction(self, gradients: StepGradients, own: Any, eps: float) -> tuple[list, Any]:
        """``(d, own)``: the gradient the base optimizer applies, and the own state after it."""
        return (gradients.first if gradients.sam is None else gradients.sam), own

    def observe(self, before: Any, after: Any, gradients: StepGradients, finite: Tensor) -> Any:
        """The own state the step leaves: ``after`` where the step was taken (``finite``), else ``before``."""
        return select_fields(finite, after, before)

    def own_state_problem(self, own: Any) -> str | None:
        """Why ``own`` (of ``own_type``, restored from a checkpoint) is no state a run of this mode can
        have, or None. Host-side, read once at load time; shapes and dtypes are checked before."""
        return None

    def first_norm(self, gradients: StepGradients) -> Tensor:
        """||g||, the plain norm of the first gradient."""
        return global_norm(gradients.first) if gradients.first_norm is None else gradients.first_norm

    # --- the pure step's state ------------------------------------------------------------------

    def init_state(self, base: Any, params: PyTree) -> Any:
        """The pure step's state: ``base.init(params)``, wrapped in ``state_type`` with the own state."""
        base_state = base.init(params)
        if self.state_type is None:
            return base_state
        leaves, spec = flatten(params)
        return self.join_state(base_state, self.init(leaves), spec)

    def base_state_of(self, state: Any) -> Any:
        """The base optimizer's part of the pure step's state (TypeError if it is not this mode's kind)."""
        if self.state_type is None:
            return state
        if not isinstance(state, self.state_type):
            raise TypeError(f"momentum_state must be a funcsam.{self.state_type.__name__} for mode={self!r}: create "
                            f"it with mode.init_state(base, params), got {type(state).__name__}")
        return state.base_state

    def own_state_of(self, state: Any, spec: Any, params: list) -> Any:
        """The mode's own part of the pure step's state, per-parameter fields flattened and checked
        against ``params`` (flat, in ``spec``'s order); None for a mode without state."""
        if self.state_type is None:
            return None
        self.base_state_of(state)
        return self.own_type(*[
            flatten_like_params(value, f"momentum_state.{field}", spec, params) if field in self.per_parameter else value
            for field, value in zip(self.own_type._fields, state[1:])
        ])

    def join_state(self, base_state: Any, own: Any, spec: Any) -> Any:
        """The pure step's state from the base state and the own state (flat per-parameter fields)."""
        if self.state_type is None:
            return base_state
        fields = [unflatten(spec, value) if field in self.per_parameter else value
                  for field, value in zip(self.own_type._fields, own)]
        return self.state_type(base_state, *fields)


@dataclass(frozen=True)
class FullSAM(Mode):
    """SAM on every step (Foret et al. 2020): ``mode=None`` means this."""


def select_fields(condition: Tensor, if_true: Any, if_false: Any) -> Any:
    """Fieldwise ``torch.where`` of two own states of one kind (per-parameter fields leafwise);
    the same state twice (a step that left it as it was) comes back as it is, with no kernel."""
    if if_true is None or if_true is if_false:
        return if_true
    return type(if_true)(*[
        select(condition, a, b) if isinstance(a, (list, tuple)) else torch.where(condition, a, b)
        for a, b in zip(if_true, if_false)
    ])


def flatten_like_params(tree: PyTree, name: str, spec: Any, params: list) -> list[Tensor]:
    """The leaves of a per-parameter state field, checked against the parameters, detached."""
    leaves, field_spec = flatten(tree)
    if not same_structure(field_spec, spec) or len(leaves) != len(params) or any(
        leaf.shape != param.shape or leaf.dtype != param.dtype for leaf, param in zip(leaves, params)
    ):
        raise ValueError(f"{name} does not have the structure, shapes and dtypes of params: create the state "
                         "with mode.init_state(base, params)")
    return [leaf.detach() for leaf in leaves]


def check_mode(mode: Any) -> Mode:
    """``mode`` as a :class:`Mode` (None is :class:`FullSAM`); TypeError naming the choices otherwise."""
    if mode is None:
        return FullSAM()
    if isinstance(mode, Mode):
        return mode
    from .schedules import every, late  # the factories, named in the message as the classes are

    factories = ((every, "funcsam.every(5)"), (late, "funcsam.late(1000)"))
    example = next((text for factory, text in factories if mode is factory), None)
    if isinstance(mode, type) and issubclass(mode, Mode):
        example = mode.example
    if example is not None:
        raise TypeError(f"mode must be a mode object, e.g. mode={example}, not {mode.__name__} itself")
    raise TypeError(
        "mode must be None (SAM on every step), funcsam.every(k), funcsam.late(start_step), funcsam.LookSAM(k, alpha), "
        "funcsam.MSAM(), funcsam.GSAM(alpha), funcsam.AESAM(total_steps) or funcsam.RST(p), "
        f"got {type(mode).__name__} {mode!r:.80}"
    )


def check_step(step: Any) -> None:
    check_int("step", step, minimum=0, meaning="the 0-based index of the training step, a Python int")
