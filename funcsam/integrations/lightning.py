"""SAM in Lightning's automatic optimization, in every precision: a precision plugin that passes the closure.

funcsam's optimizers take SAM's two passes through the closure Lightning hands to ``optimizer.step``
(training_step, zero_grad, backward). Lightning's own plugins call it themselves in two places:

    MixedPrecision("16-mixed") (fp16 with a GradScaler): closure(); scaler.unscale_(opt); scaler.step(opt)
                               -> step() without a closure: "SAMSGD.step needs a closure"
    Precision (32-true), MixedPrecision("bf16-mixed"): opt.step(closure), and after *each* closure call
                               the on_before_optimizer_step hooks and gradient clipping (twice per SAM step)

The plugins here give a funcsam optimizer (any :class:`funcsam.SAMOptimizer`) one SAM step::

    loss = optimizer.step(closure', grad_scaler=scaler)      closure' = Lightning's closure, and after its
    scaler.update()                                          first call the on_before_optimizer_step hooks

with ``Trainer(gradient_clip_val=c)`` applied as the optimizer's ``max_grad_norm=c``: the SAM gradient
is clipped by its global norm just before the base step (the gradient at w is not: its scale cancels in
e = rho * g / ||g||). Any other optimizer steps as under Lightning's own plugin. Usage, two lines::

    trainer = L.Trainer(plugins=[sam_precision("16-mixed", "cuda")], ...)   # instead of precision="16-mixed"
    def configure_optimizers(self):                                           # in the LightningModule
        return funcsam.SAM(self.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3, model=self)

``accumulate_grad_batches > 1`` is refused: Lightning runs the earlier micro-batches' closures itself,
outside ``optimizer.step``, so SAM would climb with the full gradient but take the gradient at w + e
of the last micro-batch only. Accumulate inside one closure instead (manual optimization: a closure
that runs backward over every micro-batch; both passes then see all of them). Checkpoints need
nothing: Lightning saves ``optimizer.state_dict()``, whose ``"funcsam"`` entry carries the step
count and the mode's state, and the plugin's scaler.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Literal

import torch
import lightning.pytorch as pl
from lightning.pytorch.loops.optimization.closure import AbstractClosure
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.model_helpers import is_overridden

from ..adapter import SAMOptimizer

__all__ = ["SAMMixedPrecision", "SAMPrecision", "sam_precision"]


class SAMSteps:
    """What both plugins add to Lightning's: a funcsam optimizer takes :func:`sam_optimizer_step` (with
    the plugin's GradScaler, if any); any other optimizer the plugin's own step."""

    def connect(self, model, optimizers: list, lr_schedulers: list):
        check_no_accumulation(model, optimizers)
        return super().connect(model, optimizers, lr_schedulers)

    def optimizer_step(self, optimizer, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if not isinstance(optimizer, SAMOptimizer):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        return sam_optimizer_step(optimizer, model, closure, getattr(self, "scaler", None), **kwargs)


class SAMPrecision(SAMSteps, Precision):
    """Lightning's ``"32-true"`` precision, with SAM's step for funcsam optimizers (module docstring)."""


class SAMMixedPrecision(SAMSteps, MixedPrecision):
    """Lightning's ``MixedPrecision`` (``"bf16-mixed"``, ``"16-mixed"`` with its GradScaler), with SAM's
    step for funcsam optimizers: the closure and the scaler go to ``optimizer.step(closure, grad_scaler=)``,
    which scales both passes' gradients back before any norm, then ``scaler.update()`` (module docstring).

    Args: as ``MixedPrecision``: ``precision`` (``"16-mixed"`` or ``"bf16-mixed"``), ``device``
    (``"cuda"``, ``"cpu"``: autocast's device type) and ``scaler`` (a ``torch.amp.GradScaler``;
    with ``"16-mixed"`` one is made for ``device`` if not given).
    """


def sam_precision(precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true", device: str = "cuda",
                  scaler: torch.amp.GradScaler | None = None) -> Precision:
    """The plugin for ``Trainer(plugins=[...])`` that stands for ``Trainer(precision=precision)`` with SAM:
    :class:`SAMPrecision` for ``"32-true"``, :class:`SAMMixedPrecision` (autocast on ``device``; for
    ``"16-mixed"`` with ``scaler`` or a new ``torch.amp.GradScaler(device)``) for the other two."""
    if precision in ("32-true", "32", 32):
        if scaler is not None:
            raise ValueError(f"precision='32-true' takes no GradScaler, got scaler={scaler!r}: the scaler is for "
                             "'16-mixed'")
        return SAMPrecision()
    if precision in ("16-mixed", "bf16-mixed"):
        return SAMMixedPrecision(precision, device, scaler)
    raise ValueError(f"precision must be '32-true', 'bf16-mixed' or '16-mixed', got {precision!r}; for "
                     "'16-true'/'bf16-true' (weights in half precision) SAM needs no plugin: pass precision= as usual")


def sam_optimizer_step(optimizer: SAMOptimizer, model: pl.LightningModule, closure: Callable[[], Any],
                       grad_scaler: torch.amp.GradScaler | None, **kwargs: Any) -> Any:
    """One SAM step of ``optimizer`` through Lightning's ``closure``; returns the loss at w.

    The ``on_before_optimizer_step`` hooks run once, after the first backward pass (the gradient at
    w; under fp16 still scaled: the optimizer unscales it in the step). ``training_step``'s output
    (what ``on_train_batch_end`` receives) is the first pass's, at w. A ``training_step`` that
    returns None skips the step, as in Lightning: nothing moves and the scaler is not updated.
    """
    trainer = model.trainer
    check_no_accumulation(model, [optimizer])
    results = []  # each call's ClosureResult (Lightning's own closure), or None (another callable)

    def lightning_closure():
        loss = closure()
        results.append(closure._result if isinstance(closure, AbstractClosure) else None)
        if len(results) == 1:
            if loss is None and model.automatic_optimization:
                raise _SkippedStep  # before the optimizer has changed anything
            call._call_callback_hooks(trainer, "on_before_optimizer_step", optimizer)
            call._call_lightning_module_hook(trainer, "on_before_optimizer_step", optimizer)
        return loss

    try:
        with clipping_as_max_grad_norm(optimizer, model):
            loss = optimizer.step(lightning_closure, grad_scaler=grad_scaler, **kwargs)
    except _SkippedStep:
        return None
    if grad_scaler is not None:
        grad_scaler.update()
    if isinstance(closure, AbstractClosure) and results:
        closure._result = results[0]  # the outputs Lightning reads are the pass at w's, not w + e's
    return loss


class _SkippedStep(Exception):
    """Raised from the closure when ``training_step`` returned None: the step is not taken."""


@contextlib.contextmanager
def clipping_as_max_grad_norm(optimizer: SAMOptimizer, model: pl.LightningModule):
    """Within the block, ``optimizer.max_grad_norm`` is ``Trainer(gradient_clip_val=)`` (when set): the
    SAM gradient, not each pass's, is clipped by its global norm before the base step."""
    trainer = model.trainer
    clip = trainer.gradient_clip_val
    if not clip:
        yield
        return
    algorithm = trainer.gradient_clip_algorithm
    if algorithm not in (None, GradClipAlgorithmType.NORM):  # None: Lightning's default, the norm
        raise ValueError(f"gradient_clip_algorithm={str(algorithm.value)!r} with a funcsam optimizer: SAM clips the SAM "
                         "gradient by its global norm only; use gradient_clip_algorithm='norm'")
    if is_overridden("configure_gradient_clipping", model):
        raise ValueError(f"{type(model).__name__} overrides configure_gradient_clipping, which a funcsam optimizer "
                         "does not call: SAM clips the SAM gradient inside its step. Remove the override and set "
                         "Trainer(gradient_clip_val=...) or the optimizer's max_grad_norm=")
    own = optimizer.max_grad_norm
    if own is not None and own != clip:
        raise ValueError(f"the optimizer's max_grad_norm={own} and Trainer(gradient_clip_val={clip}) disagree: "
                         "set one of them")
    optimizer.max_grad_norm = float(clip)
    try:
        yield
    finally:
        optimizer.max_grad_norm = own


def check_no_accumulation(model, optimizers: list) -> None:
    """A ValueError when a funcsam optimizer would step with ``accumulate_grad_batches > 1`` (module docstring)."""
    trainer = getattr(model, "_trainer", None)
    if trainer is None or not any(isinstance(optimizer, SAMOptimizer) for optimizer in optimizers):
        return
    if trainer.accumulate_grad_batches > 1:
        raise ValueError(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} with a funcsam optimizer: Lightning runs the "
            "earlier micro-batches' backward passes outside optimizer.step, so SAM's pass at w + e would see the last "
            "micro-batch only. Use accumulate_grad_batches=1 with the whole batch; or, in manual optimization "
            "(self.automatic_optimization = False), split the batch in training_step and pass optimizer.step a "
            "closure that calls self.manual_backward(loss / n) for each of the n micro-batches: SAM then takes both "
            "gradients over all of them (the funcsam docs' Lightning guide shows it)"
        )
