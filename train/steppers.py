"""One stepper per API, behind the same small interface, so the training loop never asks which.

    stepper = make_stepper(args, model, lr_at, mean, std, device, grad_reduce)
    totals = stepper.step(totals, images_u8, labels, augmentation, step_index)   # one SAM (or SGD) step
    params, buffers = stepper.params_buffers()                                    # for evaluation
    stepper.state_dict() / stepper.load_state_dict(saved, path)                   # checkpoint and resume

Both step with the mode object that ``--sam-mode`` names in ``train.sam_modes``' one table.
``FunctionalStepper`` carries a ``TrainState`` pytree through one pure function around
``funcsam.sam_step`` (the mode, the gradient source of ``--m-sharpness``/``--accumulate``, and
``funcsam.SAMOptions``), which ``--compile`` makes one fullgraph region per branch; the learning rate
and rho travel as 0-dim tensors so the schedule never recompiles. ``AdapterStepper`` runs the same
recipe through the closure-style ``funcsam.SAMSGD`` (``--base sgd``) or ``funcsam.SAM`` over
``torch.optim.AdamW`` (``--base adamw``) with a ``LambdaLR`` schedule (and a ``GradScaler`` under
fp16), the mode as its ``mode=``; under torchrun over ``DistributedDataParallel`` (``--sam-sync``).
Loss and accuracy are summed into ``TrainTotals`` on the device, so no step waits for the host.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
from typing import Callable, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch.func import functional_call

import funcsam
from funcsam.ddp import is_ddp
from train.checkpoint import CheckpointError, check_tensors
from train.data import augment, normalize
from train.sam_modes import make_mode


class TrainState(NamedTuple):
    """Everything the functional step carries from one step to the next (a pytree of tensors)."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    momentum_state: funcsam.MomentumState | funcsam.AdamState  # the base optimizer's state
    loss_scale: funcsam.LossScaleState | None  # fp16 only


class TrainTotals(NamedTuple):
    """Running sums over an epoch, kept on the device so that steps need no host sync."""

    loss_sum: torch.Tensor  # fp32, sum over samples of the first-pass loss
    correct: torch.Tensor  # int64, first-pass logits' argmax == label
    diverged_steps: torch.Tensor  # int64, steps whose loss was non-finite (or skipped without loss scaling)
    skipped_steps: torch.Tensor  # int64, steps sam_step skipped (fp16 overflow)


def zero_totals(device: torch.device) -> TrainTotals:
    f, i = dict(dtype=torch.float32, device=device), dict(dtype=torch.int64, device=device)
    return TrainTotals(torch.zeros((), **f), torch.zeros((), **i), torch.zeros((), **i), torch.zeros((), **i))


def add_step_to_totals(totals: TrainTotals, loss, logits, labels, finite, loss_scaling: bool) -> TrainTotals:
    bad_loss = ~torch.isfinite(loss)
    # Skipped steps are routine under fp16 loss scaling (an overflow halves the scale); without it,
    # a non-finite gradient is as much a divergence as a non-finite loss.
    diverged = bad_loss if loss_scaling else bad_loss | ~finite
    return TrainTotals(
        loss_sum=totals.loss_sum + loss.detach().float() * labels.shape[0],
        correct=totals.correct + (logits.detach().argmax(-1) == labels).sum(),
        diverged_steps=totals.diverged_steps + diverged.to(torch.int64),
        skipped_steps=totals.skipped_steps + (~finite).to(torch.int64),
    )


def autocast_dtype(amp: str | None) -> torch.dtype | None:
    return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast_context(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(amp))


def memory_format(args: argparse.Namespace) -> torch.memory_format:
    """The layout of the model's convolution weights and of the inputs (--channels-last)."""
    return torch.channels_last if args.channels_last else torch.contiguous_format


def make_criterion(args: argparse.Namespace, reduction: str = "mean") -> Callable:
    return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=args.label_smoothing, reduction=reduction)


def make_stepper(args, model, lr_at: Callable[[int], float], mean, std, device, grad_reduce=None, *,
                 steps_per_epoch: int):
    """The stepper of ``args.api``; ``lr_at(step_index)`` is the learning rate schedule. Both step with
    the same mode object, from the one table of ``--sam-mode`` values (``train.sam_modes``)."""
    mode = make_mode(args, steps_per_epoch)
    if args.api == "functional":
        return FunctionalStepper(args, model, lr_at, mean, std, device, grad_reduce, mode=mode)
    if getattr(args, "fsdp", False):
        from train.fsdp import ShardedAdapterStepper  # torch.distributed.fsdp only for --fsdp runs

        return ShardedAdapterStepper(args, model, lr_at, mean, std, device, mode=mode, steps_per_epoch=steps_per_epoch)
    return AdapterStepper(args, model, lr_at, mean, std, device, mode=mode)


def make_base(args: argparse.Namespace) -> funcsam.SGD | funcsam.Adam:
    """The pure base optimizer of ``--base`` for ``funcsam.sam_step(..., base=...)``."""
    if args.base == "adamw":
        return funcsam.adamw(betas=tuple(args.betas), weight_decay=args.weight_decay)
    return funcsam.sgd(momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov)


def detached(named) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in named}


# --- functional: a pure step over a TrainState ------------------------------------------------


def compile_scope(args, device: torch.device) -> str | None:
    """What --compile compiles in the functional API: "step", "loss" or None (eager); see --compile-scope."""
    if not args.compile:
        return None
    if args.compile_scope != "auto":
        return args.compile_scope
    # Measured on a 2-core CPU (ResNet-20, batch 128, bench.report): in channels_last (the default) the
    # whole step compiled took 533 ms, the eager step around a compiled loss function 547 ms; in NCHW
    # 666 and 545 ms, because inductor's layout choice for the convolutions does not reach the backward
    # half of a torch.func.grad graph (README, "Where the compiled step loses"). m-sharpness vmaps the
    # loss function, which a compiled function cannot be.
    return "loss" if device.type == "cpu" and not args.channels_last and args.m_sharpness == 1 else "step"


def compile_training(fn: Callable, args: argparse.Namespace, **kwargs) -> Callable:
    """``torch.compile(fn, mode=--compile-mode)``: how every training-side function is compiled."""
    return torch.compile(fn, mode=args.compile_mode, **kwargs)


def uses_cuda_graphs(args: argparse.Namespace, device: torch.device) -> bool:
    """Whether the compiled training step replays as CUDA graphs (--compile-mode reduce-overhead on a GPU)."""
    return args.compile and args.compile_mode == "reduce-overhead" and device.type == "cuda"


def make_functional_step(model, args, criterion, mean, std, grad_reduce=None, compile_loss: bool = False, *,
                         mode: funcsam.Mode | None = None) -> Callable:
    """``step(state, totals, images_u8, labels, crop_offsets, flips, cutout_centres, lr, rho, take_sam)
    -> (state, totals)``: augmentation, the SAM step of ``mode`` and the base update, pure.

    The images are this process's shard of the global batch; ``grad_reduce`` (an all-reduce mean
    under data parallelism) averages the gradients across processes. ``--m-sharpness K`` and
    ``--accumulate K`` pick the gradient source (``funcsam.MSharpness(K)``, ``funcsam.MicroBatches()``):
    one ``funcsam.sam_step`` either way, so ``--compile`` still makes one fullgraph region of it,
    one graph per value of ``take_sam`` (decided on the host)."""
    loss_fn = funcsam.make_loss_fn(model, criterion, autocast_dtype=autocast_dtype(args.amp))
    if compile_loss:
        loss_fn = compile_training(loss_fn, args, fullgraph=True)
    base = make_base(args)
    per_example_criterion = make_criterion(args, reduction="none")
    source = make_source(args, lambda: funcsam.make_loss_fn(model, per_example_criterion,
                                                           autocast_dtype=autocast_dtype(args.amp)))
    options = funcsam.SAMOptions(adaptive=args.adaptive, grad_reduce=grad_reduce, sam_sync=args.sam_sync,
                                 perturb_mask=funcsam.norm_layer_mask(model) if args.sam_on else None)
    split = (lambda batch: funcsam.split_batch(batch, args.accumulate)) if args.accumulate > 1 else (lambda batch: batch)

    def step(state: TrainState, totals: TrainTotals, images, labels, crop_offsets, flips, cutout_centres, lr, rho,
             take_sam: bool):
        inputs = augment(images, crop_offsets, flips, cutout_centres, mean, std, args.cutout).contiguous(
            memory_format=memory_format(args))
        out = funcsam.sam_step(state.params, state.buffers, split((inputs, labels)), loss_fn, rho, lr,
                               state.momentum_state, base=base, mode=mode, take_sam=take_sam, source=source,
                               options=options, loss_scale=state.loss_scale)
        totals = add_step_to_totals(totals, out.loss, out.aux, labels, out.finite, state.loss_scale is not None)
        return TrainState(out.params, out.buffers, out.momentum_state, out.loss_scale), totals

    return step


def make_source(args: argparse.Namespace, per_example_loss: Callable[[], Callable]):
    """The gradient source of ``--m-sharpness`` / ``--accumulate`` / ``--sam-mode ksam | sds`` (None: the
    batch at once); ``per_example_loss()`` builds their loss function with one loss per example."""
    if args.sam_mode == "ksam":
        return funcsam.TopK(args.select_k, per_example_loss())
    if args.sam_mode == "sds":
        return funcsam.SDS(args.select_k, per_example_loss())
    if args.m_sharpness > 1:
        return funcsam.MSharpness(args.m_sharpness)
    return funcsam.MicroBatches() if args.accumulate > 1 else None


class FunctionalStepper:
    """``funcsam.sam_step`` as one pure (optionally compiled) function of a ``TrainState``."""

    def __init__(self, args, model, lr_at, mean, std, device, grad_reduce=None, *, mode: funcsam.Mode):
        params, buffers = detached(model.named_parameters()), detached(model.named_buffers())
        self.mode = mode
        loss_scale = funcsam.init_loss_scale(device=device) if args.amp == "fp16" else None
        self.state = TrainState(params, buffers, mode.init_state(make_base(args), params), loss_scale)
        scope = compile_scope(args, device)
        step = make_functional_step(model, args, make_criterion(args), mean, std, grad_reduce,
                                    compile_loss=scope == "loss", mode=mode)
        self._step = compile_training(step, args, fullgraph=True) if scope == "step" else step
        self.cuda_graphs = uses_cuda_graphs(args, device)
        self.lr_at = lr_at
        self.lr = torch.tensor(lr_at(0), device=device)  # filled in place each step: no recompile
        self.rho = 0 if args.optim == "sgd" else torch.tensor(args.rho, device=device)
        self.device = device

    def step(self, totals, images, labels, augmentation, step_index: int) -> TrainTotals:
        self.lr.fill_(self.lr_at(step_index))
        take_sam = self.mode.takes_sam(step_index, self.state.momentum_state)  # AE-SAM: one host read
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        state, totals = self._step(self.state, totals, images, labels, *augmentation, self.lr, self.rho, take_sam)
        if self.cuda_graphs:
            # A CUDA graph's outputs live in its pool and the next replay overwrites them: the carried
            # state and the totals leave the pool before they are read again.
            state, totals = optree.tree_map(torch.clone, (state, totals))
        self.state = state
        return totals

    def params_buffers(self):
        return self.state.params, self.state.buffers

    def state_dict(self) -> dict:
        return dict(params=self.state.params, buffers=self.state.buffers,
                    optimizer=dict(momentum_state=tree_to_list(self.state.momentum_state),
                                   loss_scale=tree_to_list(self.state.loss_scale)))

    def load_state_dict(self, saved: dict, path) -> None:
        """Restore from a checkpoint's dict; CheckpointError (nothing changed) if it does not fit."""
        check_tensors(saved["params"], self.state.params, "parameters", path)
        check_tensors(saved["buffers"], self.state.buffers, "buffers", path)
        optimizer = saved["optimizer"]
        momentum = list_to_tree(self.state.momentum_state, optimizer.get("momentum_state"), "momentum state", path)
        loss_scale = list_to_tree(self.state.loss_scale, optimizer.get("loss_scale"), "loss scale", path)
        to = self.device
        self.state = TrainState({k: saved["params"][k].to(to) for k in self.state.params},
                                {k: saved["buffers"][k].to(to) for k in self.state.buffers},
                                optree.tree_map(lambda t: t.to(to), momentum),
                                None if loss_scale is None else optree.tree_map(lambda t: t.to(to), loss_scale))


def tree_to_list(tree) -> list | None:
    return None if tree is None else optree.tree_leaves(tree)


def list_to_tree(template, leaves, what: str, path):
    """``template``'s structure filled with the saved ``leaves``, refused unless they match it leaf by leaf."""
    if template is None:
        return None
    expected = optree.tree_leaves(template)
    if not isinstance(leaves, list) or len(leaves) != len(expected) or any(
            not isinstance(s, torch.Tensor) or s.shape != e.shape or s.dtype != e.dtype
            for s, e in zip(leaves, expected)):
        raise CheckpointError(f"{path}: its {what} does not fit this model and configuration "
                              "(missing, or other shapes). It was left untouched; use another --out to start over.")
    return optree.tree_unflatten(optree.tree_structure(template), leaves)


# --- adapter: the closure-style SAMSGD optimizer ----------------------------------------------


class AdapterStepper:
    """The same recipe through ``funcsam.SAMSGD``; mutates the model and the optimizer.

    Under torchrun the model is wrapped in ``DistributedDataParallel`` (its own BatchNorm statistics
    per replica, as in the functional API), which averages the gradient of every synchronised
    backward pass; ``--sam-sync local`` has the optimizer take the first pass under ``no_sync()``.
    ``self.model`` stays the unwrapped module: its parameter names are the checkpoint's.
    """

    def __init__(self, args, model, lr_at, mean, std, device, *, mode: funcsam.Mode):
        model = sync_batchnorm_for_ddp(model, args, device)
        self.model, self.args, self.mean, self.std, self.device = model, args, mean, std, device
        # loss.backward() cannot live inside a fullgraph region: compile the forward only (DDP's
        # hooks and no_sync() stay outside it, in eager Python). Under CUDA graphs the logits a step
        # logs are copies (torch.cat), as the second pass overwrites the first's.
        self.forward = self._replicated(compile_training(model, args) if args.compile else model, device)
        self.optimizer = self._init_optimizer(args, model, mode, self.forward)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(s) / args.lr)
        self.scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
        self.criterion = make_criterion(args)
        self.cuda_graphs = uses_cuda_graphs(args, device)

    @staticmethod
    def _replicated(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """What the steps run forward: ``model`` in DDP under torchrun (:func:`data_parallel`)."""
        return data_parallel(model, device)

    @staticmethod
    def _init_optimizer(args, model, mode: funcsam.Mode, forward) -> funcsam.SAMOptimizer:
        params = funcsam.sam_on_param_groups(model) if args.sam_on else model.parameters()
        # The DDP wrapper, where there is one: sam_sync="local" runs the first pass under its no_sync().
        common = dict(rho=args.rho, adaptive=args.adaptive, model=forward if is_ddp(forward) else model, mode=mode,
                      sam_sync=args.sam_sync if is_ddp(forward) else "global")
        if args.base == "adamw":
            return funcsam.SAM(params, torch.optim.AdamW, lr=args.lr, betas=tuple(args.betas),
                               weight_decay=args.weight_decay, **common)
        return funcsam.SAMSGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                              nesterov=args.nesterov, **common)

    @property
    def _optimizer_key(self) -> str:
        """The checkpoint's name for the optimizer state ("sam_sgd" as before --base existed)."""
        return f"sam_{self.args.base}"

    def step(self, totals, images, labels, augmentation, step_index: int) -> TrainTotals:
        inputs = augment(images, *augmentation, self.mean, self.std, self.args.cutout).contiguous(
            memory_format=memory_format(self.args))
        first_logits = []
        # --accumulate K: the closure backpropagates each micro-batch's share of the batch mean in turn,
        # so p.grad holds the whole batch's gradient, as funcsam.MicroBatches accumulates it.
        micro_batches = funcsam.split_batch((inputs, labels), self.args.accumulate)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

        def closure():
            self.optimizer.zero_grad(set_to_none=True)
            losses, logits_parts = [], []
            for index, (micro_inputs, micro_labels) in enumerate(micro_batches):
                # Under DDP the micro-batches accumulate locally and the last backward averages their sum.
                with self._no_sync_unless(index == len(micro_batches) - 1):
                    with autocast_context(self.device, self.args.amp):
                        logits = self.forward(micro_inputs)
                        loss = self.criterion(logits, micro_labels) * (len(micro_labels) / len(labels))
                    (loss if self.scaler is None else self.scaler.scale(loss)).backward()
                losses.append(loss.detach().float())
                logits_parts.append(logits.detach())
            first_logits.append(torch.cat(logits_parts))
            return torch.stack(losses).sum()

        loss = self.optimizer.step(closure, grad_scaler=self.scaler)
        if self.scaler is not None:
            self.scaler.update()
        self.scheduler.step()  # its own count follows step_index: both restart from the checkpoint
        return add_step_to_totals(totals, loss, first_logits[0], labels, self.optimizer.last_step_finite,
                                  self.scaler is not None)

    def _no_sync_unless(self, synchronise: bool):
        if synchronise or not is_ddp(self.forward):
            return contextlib.nullcontext()
        return self.forward.no_sync()

    def params_buffers(self):
        return detached(self.model.named_parameters()), detached(self.model.named_buffers())

    def state_dict(self) -> dict:
        params, buffers = self.params_buffers()
        return dict(params=params, buffers=buffers, optimizer=dict(
            **{self._optimizer_key: self.optimizer.state_dict()}, lr_scheduler=self.scheduler.state_dict(),
            grad_scaler=None if self.scaler is None else self.scaler.state_dict()))

    def load_state_dict(self, saved: dict, path) -> None:
        """Restore from a checkpoint's dict; CheckpointError (nothing changed) if it does not fit."""
        params, buffers = self.params_buffers()
        self._check_saved(saved, params, buffers, path)
        optimizer = saved["optimizer"]
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(saved["params"][k])
            for k, v in buffers.items():
                v.copy_(saved["buffers"][k])
        self.optimizer.load_state_dict(optimizer[self._optimizer_key])
        self.scheduler.load_state_dict(optimizer["lr_scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(optimizer["grad_scaler"])

    def _check_saved(self, saved: dict, params: dict, buffers: dict, path) -> None:
        """CheckpointError (nothing changed) unless ``saved`` fits these params and buffers (by name and
        shape), this optimizer, and holds the scheduler's and loss scaler's state."""
        check_tensors(saved["params"], params, "parameters", path)
        check_tensors(saved["buffers"], buffers, "buffers", path)
        optimizer = saved["optimizer"]
        check_optimizer_state(optimizer.get(self._optimizer_key), list(params.values()), path)
        if not isinstance(optimizer.get("lr_scheduler"), dict) or \
                (self.scaler is not None and not isinstance(optimizer.get("grad_scaler"), dict)):
            raise CheckpointError(f"{path}: its scheduler or loss-scaler state is missing. It was left untouched; "
                                  "use another --out to start over.")


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` under torchrun (more than one process), else itself.
    BatchNorm statistics stay per replica (``broadcast_buffers=False``), as in the functional API."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch 2.14 renamed broadcast_buffers (now deprecated); it still syncs at construction, where every
    # rank holds the same buffers anyway (same seed, and a checkpoint is loaded after).
    no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                       else {"broadcast_buffers": False})
    return ddp(model, device_ids=device_ids, **no_forward_sync)


def sync_batchnorm_for_ddp(model: torch.nn.Module, args, device: torch.device) -> torch.nn.Module:
    """With --sync-bn on CUDA and several processes: ``torch.nn.SyncBatchNorm`` layers (its fused
    kernels, plain autograd) in place of the model's (funcsam's, which ``train`` put there for the
    functional API; same parameters and buffers, so the names and the checkpoint are unchanged).
    Elsewhere the model as it is: funcsam's ``SyncBatchNorm`` runs under plain autograd on gloo too."""
    multi_process = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if not (args.sync_bn and device.type == "cuda" and multi_process):
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def check_optimizer_state(state_dict, params: list[torch.Tensor], path) -> None:
    """An optimizer state dict whose per-parameter tensors (momentum buffers, moments) have their parameter's shape."""
    try:
        states = state_dict["state"]
        fits = len(state_dict["param_groups"][0]["params"]) == len(params) and all(
            t.shape == params[i].shape for i, s in states.items() for t in s.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0)
    except (KeyError, IndexError, TypeError, AttributeError):
        fits = False
    if not fits:
        raise CheckpointError(f"{path}: its optimizer state does not fit this model (missing, or momentum "
                              "buffers of other shapes). It was left untouched; use another --out to start over.")


# --- evaluation -------------------------------------------------------------------------------


def make_eval_step(model, args, mean, std) -> Callable:
    """``eval_step(params, buffers, images_u8, labels, valid) -> (loss_sum, correct)`` in eval
    mode; ``valid`` masks out the padding of the last batch so every batch has the same shape."""
    def eval_step(params, buffers, images, labels, valid):
        inputs = normalize(images, mean, std).contiguous(memory_format=memory_format(args))
        with autocast_context(images.device, args.amp):
            logits = functional_call(model, (params, buffers), (inputs,))
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        correct = (logits.argmax(-1) == labels) & valid
        return torch.where(valid, losses, 0.0).sum(), correct.sum()

    return torch.compile(eval_step, fullgraph=True) if args.compile else eval_step
