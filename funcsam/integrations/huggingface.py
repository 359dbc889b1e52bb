"""SAM under the Hugging Face ``Trainer``: both passes of every optimizer step, accumulation replayed at w + e.

The ``Trainer`` runs K = ``gradient_accumulation_steps`` backward passes, clips, and calls
``optimizer.step()`` without a closure. :class:`SAMTrainer` adds SAM's second pass after the K-th
backward, so that the Trainer's clipping, GradScaler, optimizer and lr scheduler see the SAM gradient::

    g      = sum_i grad L_i(w) / K          the Trainer's own K passes over micro-batches B_1 .. B_K
    e      = rho * g / (||g|| + eps)        funcsam.SAM's climb (ASAM, per-group rho, SAM-ON groups)
    g_sam  = sum_i grad L_i(w + e) / K      the same K micro-batches replayed at w + e
    w      <- w                             back to w bit for bit (BatchNorm buffers too, with model=)
    then, as in any Trainer step: clip g_sam to max_grad_norm, the base optimizer's step, the lr schedule

Usage::

    from funcsam.integrations.huggingface import SAMTrainer

    trainer = SAMTrainer(model=model, args=args, train_dataset=data, rho=0.05)   # AdamW from args
    # or your own funcsam.SAM (its base optimizer does the Trainer's optimizer.step()):
    optimizer = funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=5e-5, weight_decay=0.01)
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()

Both passes run the model in training mode: dropout draws a fresh mask in each pass. Under fp16 the
gradient is unscaled before its norm is taken, both passes are scaled with the same loss scale, and
an overflow in either skips the step through accelerate's GradScaler (the parameters are back at w
first). Under data parallelism g and g_sam are all-reduced once per step (the replay syncs on its
last micro-batch, as the Trainer does), so every replica perturbs with the global g.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import Trainer

from ..grad_scaler import inverse_scale, unscaled_grads
from ..hyperparameters import is_static_zero
from ..modes.protocol import Mode
from ..optimizer import SAM
from ..param_groups import with_gradients
from ..two_halves import Perturbed, climb, come_back

__all__ = ["SAMTrainer", "check_trainer_sam", "climb_to_perturbed_point", "follow_base_optimizer"]


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` whose every optimizer step is a SAM step (module docstring).

    Args:
        *args: as for ``transformers.Trainer``.
        rho: the neighbourhood radius of the :class:`funcsam.SAM` built from ``args`` (default 0.05)
            when ``optimizers`` holds none. With your own ``funcsam.SAM``, set it there instead.
        adaptive: ASAM for the built optimizer (default False; use a larger rho, e.g. 2).
        **kwargs: as for ``transformers.Trainer``. ``optimizers=(optimizer, scheduler)`` may hold a
            :class:`funcsam.SAM` (``funcsam.SAM(params, torch.optim.AdamW, rho=..., lr=...)``), and a
            scheduler built on it or ``None`` (the Trainer builds ``args.lr_scheduler_type``).

    Without a ``funcsam.SAM`` in ``optimizers``, the Trainer builds its optimizer from ``args``
    (``optim``, ``learning_rate``, ``weight_decay`` with its no-decay group for biases and norms,
    Adam's betas and epsilon) and :class:`SAMTrainer` wraps it: ``funcsam.SAM(its param groups, its
    class, rho=rho, adaptive=adaptive, model=model)``. Either way ``self.sam_optimizer`` is that
    ``funcsam.SAM`` and ``self.optimizer`` its base optimizer, the one the Trainer steps, clips for,
    checkpoints and schedules.

    Clipping is the Trainer's ``args.max_grad_norm``, applied to g_sam (the funcsam.SAM must not clip
    too). Modes: SAM on every step, ``funcsam.every(k)`` and ``funcsam.late(start_step)`` (counted in
    optimizer steps, ``state.global_step``); the modes that change the direction or keep state of
    their own (GSAM, LookSAM, MSAM, AE-SAM) need ``funcsam.SAM.step(closure)``, which the Trainer
    does not call. DeepSpeed steps inside its backward and is refused.
    """

    def __init__(self, *args, rho: float | None = None, adaptive: bool = False, **kwargs):
        optimizer, scheduler = kwargs.get("optimizers", (None, None))
        if optimizer is not None and not isinstance(optimizer, SAM):
            raise TypeError(
                f"SAMTrainer's optimizers=(optimizer, scheduler) takes a funcsam.SAM or None, got "
                f"{type(optimizer).__name__}: wrap the base optimizer, e.g. funcsam.SAM(model.parameters(), "
                "torch.optim.AdamW, rho=0.05, lr=5e-5) (for SAMSGD: funcsam.SAM(..., torch.optim.SGD, ...)), or pass "
                "optimizers=(None, None) and rho= to wrap the optimizer the Trainer builds from its arguments")
        if optimizer is not None and (rho is not None or adaptive):
            raise ValueError("rho and adaptive are the funcsam.SAM's: set them in funcsam.SAM(..., rho=, adaptive=) "
                             "and leave SAMTrainer's rho/adaptive out, or pass no optimizer")
        self.sam_optimizer: SAM | None = None
        self._rho = 0.05 if rho is None else rho
        self._adaptive = adaptive
        self._micro_batches: list = []
        if optimizer is not None:
            check_trainer_sam(optimizer)
            self.sam_optimizer = optimizer
            kwargs["optimizers"] = (optimizer.base_optimizer, scheduler)
        super().__init__(*args, **kwargs)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError("SAMTrainer does not run under DeepSpeed: DeepSpeed takes the optimizer step inside its "
                             "backward, before SAM's second pass could run; use DDP or FSDP")

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer from ``args``, wrapped in a ``funcsam.SAM`` (see the class docstring);
        returns the base optimizer, which the Trainer steps."""
        if self.optimizer is None:  # none given, or model_init asks for a fresh one
            base = super().create_optimizer(model)
            groups = [dict(group) for group in base.param_groups]  # with Adam's eps, which SAM's own eps would shadow
            self.sam_optimizer = SAM(groups, type(base), rho=self._rho, adaptive=self._adaptive,
                                     model=self.model if model is None else model)
            self.optimizer = self.sam_optimizer.base_optimizer
        return self.optimizer

    def train(self, *args, **kwargs):
        self._micro_batches = []  # a run stopped mid-window left some
        return super().train(*args, **kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """The Trainer's forward and backward at w; after the last micro-batch of an optimizer step,
        SAM's pass at w + e over all of them (module docstring). Returns the loss at w."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._micro_batches.append(inputs)
        if self.accelerator.sync_gradients:  # the Trainer's optimizer step follows this micro-batch
            micro_batches, self._micro_batches = self._micro_batches, []
            follow_base_optimizer(self.sam_optimizer)
            if self._takes_sam():
                self._replace_gradient_with_sam_gradient(model, micro_batches, num_items_in_batch)
        return loss

    def _takes_sam(self) -> bool:
        sam = self.sam_optimizer
        return sam.mode.takes_sam(self.state.global_step) and not all(
            is_static_zero(group["rho"]) for group in sam.param_groups)

    def _replace_gradient_with_sam_gradient(self, model: torch.nn.Module, micro_batches: list,
                                            num_items_in_batch: torch.Tensor | int | None) -> None:
        """p.grad: g (the accumulated gradient at w) -> g_sam (at w + e, accumulated over the same
        micro-batches with the Trainer's own loss scaling); the parameters end back at w."""
        perturbed = climb_to_perturbed_point(self.sam_optimizer, self.accelerator.scaler)
        try:
            model.zero_grad(set_to_none=True)  # every p.grad, also of params the SAM does not hold: clipping reads them
            for index, micro_batch in enumerate(micro_batches):
                last = index == len(micro_batches) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    super().training_step(model, micro_batch, num_items_in_batch)
        finally:
            with torch.no_grad():
                come_back(perturbed, self.sam_optimizer.model, perturbed.first_pass_buffers)


def follow_base_optimizer(sam: SAM) -> None:
    """Point ``sam`` at its base optimizer's current param groups and state, and mark it stepped.

    The Trainer steps the base optimizer itself, and a ``load_state_dict`` on it (accelerate's
    ``prepare`` does one, so does resuming from a checkpoint) replaces its param-group dicts and state:
    SAM would go on reading the old ones, and a scheduler built on SAM would set a learning rate that
    no step reads. ``_opt_called`` is what a torch lr scheduler checks before its own step.
    """
    sam.param_groups = sam.base_optimizer.param_groups
    sam.state = sam.base_optimizer.state
    sam._opt_called = True


@torch.no_grad()
def climb_to_perturbed_point(sam: SAM, grad_scaler: torch.amp.GradScaler | None) -> Perturbed:
    """Move ``sam``'s params that have a gradient to w + e, e from the gradient in p.grad (unscaled
    in place first when ``grad_scaler`` is an enabled GradScaler); returns what :func:`come_back` needs."""
    groups = with_gradients(sam.param_groups, "the backward passes at w")
    params = [p for _, group_params in groups for p in group_params]
    grads = unscaled_grads(params, inverse_scale(grad_scaler))
    return climb(groups, grads, None, eta=sam.eta, eps=sam.eps, model=sam.model, pre_step_buffers=None,
                 rho_scale=sam.mode.rho_scale)


def check_trainer_sam(sam: SAM) -> None:
    """Refuse a ``funcsam.SAM`` that a Trainer cannot step as it asks: one that clips (the Trainer
    clips), or a mode whose step is not g_sam on the steps it picks."""
    if sam.max_grad_norm is not None:
        raise ValueError(
            f"the funcsam.SAM has max_grad_norm={sam.max_grad_norm}, and the Trainer clips as well: build it without "
            "max_grad_norm and set TrainingArguments(max_grad_norm=...), which SAMTrainer applies to the SAM gradient")
    mode = sam.mode
    plain = (mode.ascent == "gradient" and not mode.uses_first_gradient and mode.own_type is None
             and type(mode).direction is Mode.direction)
    if not plain:
        raise ValueError(
            f"SAMTrainer takes SAM (or funcsam.every(k), funcsam.late(s)) on the Trainer's optimizer steps; "
            f"mode={mode!r} changes the direction or keeps state of its own, which needs funcsam.SAM.step(closure) "
            "in a loop of your own (see docs/guide/huggingface.md)")
