"""Checks of the step's hyperparameters, shared by ``sam_step`` and ``SAMSGD``.

Each bad value raises a ``ValueError`` (or ``TypeError`` for a wrong type) that names the argument
and says what it accepts. Tensor-valued ``lr``/``rho`` (for torch.compile) must be 0-dim and floating;
their values are checked only when they live on the CPU outside compilation, because reading a GPU
value would force a host sync on every step.
"""

from __future__ import annotations

import numbers

import torch


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_symbolic(value) -> bool:
    """A number torch.compile traces symbolically (a Python number it chose to make dynamic)."""
    return isinstance(value, (torch.SymInt, torch.SymFloat))


def check_scalar(name: str, value, *, allow_tensor: bool = False, minimum: float = 0.0) -> None:
    """``value`` must be a real number >= ``minimum`` (or a 0-dim floating tensor if allowed).
    A symbolic number under torch.compile has no value to check: it passes."""
    if _is_symbolic(value):
        return
    if isinstance(value, torch.Tensor):
        if not allow_tensor:
            raise TypeError(f"{name} must be a Python number, got a tensor; use float({name})")
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(
                f"{name} must be a 0-dim floating tensor, got shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_value(name, value.item(), minimum)
        return
    if not _is_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    _check_value(name, value, minimum)


def _check_value(name: str, value: float, minimum: float) -> None:
    # value - value is 0 for every finite number and NaN for inf and NaN; unlike math.isfinite it also
    # traces when torch.compile made the number symbolic.
    if not value - value == 0:
        raise ValueError(f"{name} must be a finite number, got {value}")
    if not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_sam_options(*, eta: float, eps: float, max_grad_norm: float | None) -> None:
    """Raise on a bad ASAM offset, norm epsilon or clipping norm."""
    check_scalar("eta", eta)
    check_scalar("eps", eps)
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps a zero gradient from giving NaN), got {eps}")
    if max_grad_norm is not None:
        check_scalar("max_grad_norm", max_grad_norm)
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm}")


def is_static_zero(value) -> bool:
    """True for a Python number equal to 0: rho given this way means plain SGD, one pass. (Under
    torch.compile a symbolic number is compared too: the graph is specialised on the answer.)"""
    return (_is_number(value) or _is_symbolic(value)) and bool(value == 0)


def is_finite_number(value) -> bool:
    """A real Python number that is neither inf nor NaN (value - value is 0 exactly for those)."""
    return _is_number(value) and value - value == 0


def check_int(name: str, value, *, minimum: int, meaning: str = "") -> None:
    """``value`` must be a Python int >= ``minimum``; TypeError or ValueError naming ``name`` (and what it means)."""
    why = f" ({meaning})" if meaning else ""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int{why}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{why}, got {value}")
