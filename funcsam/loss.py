"""Turning an ``nn.Module`` and a criterion into the pure loss function that ``sam_step`` takes."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch.func import functional_call

from .tree import Tensor, clone_all

LossFn = Callable[[dict, dict, Any], "tuple[Tensor, tuple[dict, Any]]"]


def make_loss_fn(
    model: torch.nn.Module,
    criterion: Callable[[Tensor, Tensor], Tensor],
    *,
    autocast_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format | str | None = "auto",
) -> LossFn:
    """Build ``loss_fn(params, buffers, batch) -> (loss, (new_buffers, logits))``.

    Args:
        model: the module whose forward is ``model(inputs) -> logits``. Its own parameters and
            buffers are never read or written: ``params``/``buffers`` (dicts name -> tensor, as
            from ``named_parameters()``/``named_buffers()``) are substituted with
            ``torch.func.functional_call``.
        criterion: ``criterion(logits, targets) -> scalar loss``, e.g. ``F.cross_entropy``.
        autocast_dtype: if given (``torch.bfloat16`` or ``torch.float16``), the forward and the
            criterion run under ``torch.autocast`` on the inputs' device type. fp32 parameters
            still get fp32 gradients. fp16 needs loss scaling (``funcsam.init_loss_scale``).
        memory_format: the layout the forward computes in. ``"auto"`` (default): under
            ``torch.compile``, ``torch.channels_last`` for a model with 2-D convolutions
            (``torch.channels_last_3d`` with 3-D ones only), as inductor's layout optimisation picks
            for ``torch.compile(model)``; eager calls, and models without convolutions, compute in
            the layout the tensors are stored in. ``torch.channels_last`` or
            ``torch.channels_last_3d``: that layout, eager and compiled. ``None``: the stored layout
            always (the opt-out). Computing in a layout copies every parameter and input of its rank
            (4-D, resp. 5-D) into it first (``Tensor.contiguous(memory_format=)``, differentiable, so
            the gradients of the stored parameters are unchanged in value and the parameters keep
            their layout; a tensor already in it is not copied). Why compiled steps want it: over
            contiguous (NCHW) storage, inductor's layout choice for the convolutions does not reach
            the backward half of a ``torch.func.grad`` graph, which then transposes every
            activation; computing in channels_last removes that (a ResNet-20 gradient on the CPU:
            457 -> 337 ms). Storing the model and inputs channels_last (``model.to(memory_format=
            torch.channels_last)``) is faster still (293 ms) and needs no copy.

    ``batch`` is ``(inputs, targets)``. ``new_buffers`` holds the buffers after the forward pass
    (BatchNorm running statistics updated in training mode); the dict passed in is left untouched,
    because the forward writes into a clone.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(criterion):
        raise TypeError(f"criterion must be callable as criterion(logits, targets), got {criterion!r}")
    compiled_format = convolution_memory_format(model) if memory_format == "auto" else memory_format
    eager_format = None if memory_format == "auto" else memory_format
    layout_ranks = {fmt: check_memory_format(fmt) for fmt in (compiled_format, eager_format)}

    def loss_fn(params: dict, buffers: dict, batch: Any):
        inputs, targets = unpack_batch(batch)
        # A Python branch on a constant: dynamo traces is_compiling() as True, eager calls see False.
        layout = compiled_format if torch.compiler.is_compiling() else eager_format
        if layout is not None:
            rank = layout_ranks[layout]
            params = {name: in_memory_format(p, layout, rank) for name, p in params.items()}
            inputs = in_memory_format(inputs, layout, rank)
        # functional_call writes BatchNorm's in-place running-stat updates into the tensors it is
        # given: hand it clones so that the caller's buffers stay as they were.
        new_buffers = dict(zip(buffers.keys(), clone_all(list(buffers.values()))))
        autocast = (
            torch.autocast(device_type=inputs.device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            logits = functional_call(model, (params, new_buffers), (inputs,))
            loss = criterion(logits, targets)
        return loss.float(), (new_buffers, logits)

    return loss_fn


def unpack_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch, or a TypeError saying what the batch must be."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    got = (f"a tensor of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor)
           else f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__)
    raise TypeError(f"a make_loss_fn loss function takes batch = (inputs, targets), got {got}: pass the targets "
                    "too, e.g. (x, y); for a list of micro-batches use source=funcsam.MicroBatches()")


# The memory formats a loss function may compute in, and the rank of the tensors each applies to.
_LAYOUT_RANKS = {torch.channels_last: 4, torch.channels_last_3d: 5}


def check_memory_format(memory_format: torch.memory_format | None) -> int | None:
    """The tensor rank ``memory_format`` applies to (4 for channels_last, 5 for channels_last_3d),
    or None for None; anything else is a ValueError."""
    if memory_format is None:
        return None
    if not any(memory_format is known for known in _LAYOUT_RANKS):
        raise ValueError(f"memory_format must be \"auto\", None, torch.channels_last or torch.channels_last_3d, got "
                         f"{memory_format!r}; None computes in the layout the tensors are stored in")
    return _LAYOUT_RANKS[memory_format]


def convolution_memory_format(model: torch.nn.Module) -> torch.memory_format | None:
    """The layout ``"auto"`` computes a compiled forward in: ``torch.channels_last`` if ``model`` has a
    2-D convolution, ``torch.channels_last_3d`` if it has 3-D ones only, None without convolutions."""
    ranks = {module.weight.dim() for module in model.modules()
             if isinstance(module, torch.nn.modules.conv._ConvNd) and isinstance(module.weight, torch.Tensor)}
    return torch.channels_last if 4 in ranks else torch.channels_last_3d if 5 in ranks else None


# (channels to the end, and back): permute, contiguous, permute back lays a tensor out as
# .contiguous(memory_format=channels_last[_3d]) does, and also works under torch.func.vmap (m-sharpness
# parts), which has no batching rule for a clone into a memory format.
_CHANNELS_LAST_PERMUTATIONS = {4: ((0, 2, 3, 1), (0, 3, 1, 2)), 5: ((0, 2, 3, 4, 1), (0, 4, 1, 2, 3))}


def in_memory_format(x: Any, memory_format: torch.memory_format, rank: int) -> Any:
    """``x`` in ``memory_format`` if it is a tensor of ``rank`` dimensions, else ``x`` as it is.
    Differentiable: a copy, or the tensor itself when it is already in that layout."""
    if isinstance(x, torch.Tensor) and x.dim() == rank:
        to_last, back = _CHANNELS_LAST_PERMUTATIONS[rank]
        return x.permute(to_last).contiguous().permute(back)
    return x
