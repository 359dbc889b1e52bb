"""SAM-ON: perturb only the normalisation layers' parameters.

Mueller et al., "Normalization Layers Are All That Sharpness-Aware Minimization Needs", NeurIPS 2023,
arXiv 2306.04226. With N the parameters of the normalisation layers (BatchNorm, LayerNorm, GroupNorm,
... : their affine weights and biases) and g = grad L(w)::

    e_N    = rho * g_N / (||g_N||_2 + eps)     (ASAM: rho * T^2 g_N / (||T g_N||_2 + eps), T = |w_N| + eta)
    e      = e_N on N, 0 on every other parameter (whose gradients stay out of the norm)
    g_sam  = grad L(w + e)                     (the gradient of every parameter)
    w, s   = base.update(w, g_sam, s; lr)      (every parameter descends, as in sam_step)

The paper reports this matching or beating SAM that perturbs everything. The second gradient is
still a full pass over every parameter, so a SAM-ON step costs what a SAM step costs.

Usage, pure step and adapters::

    mask = funcsam.sam_on.norm_layer_mask(model)                  # {name: True for norm-layer params}
    out = funcsam.sam_step(params, buffers, batch, loss_fn, rho, lr, state, perturb_mask=mask, base=base)

    groups = funcsam.sam_on.sam_on_param_groups(model)            # [{norm params, perturb=True}, {rest, perturb=False}]
    optimizer = funcsam.SAMSGD(groups, lr=0.1, momentum=0.9, rho=0.5, model=model)
    optimizer = funcsam.SAM(groups, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, model=model)

Only the norm layers move, so the best rho is not SAM's: the paper tunes it separately; so should you.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

from .tree import PyTree, flatten, leaf_paths, same_structure

__all__ = ["NORM_LAYERS", "norm_layer_mask", "perturb_mask_leaves", "sam_on_param_groups"]

# _NormBase covers BatchNorm1d/2d/3d, their lazy forms, torch.nn.SyncBatchNorm, InstanceNorm and
# funcsam.distributed.SyncBatchNorm (a _BatchNorm); RMSNorm is LayerNorm without the mean.
NORM_LAYERS: tuple[type, ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def norm_layer_mask(model: nn.Module) -> dict[str, bool]:
    """``{name: bool}`` over ``model.named_parameters()``: True for the parameters of a normalisation
    layer (an instance of one of :data:`NORM_LAYERS`), False for the others.

    Shaped like ``{k: v for k, v in model.named_parameters()}``, so it is ``sam_step``'s
    ``perturb_mask`` for those params. A model without normalisation layers gives all False (which
    ``sam_step`` refuses: nothing would be perturbed).
    """
    _check_model(model)
    norm_params = {id(p) for module in model.modules() if isinstance(module, NORM_LAYERS)
                   for p in module.parameters(recurse=False)}
    return {name: id(p) in norm_params for name, p in model.named_parameters()}


def sam_on_param_groups(model: nn.Module, **group_options: Any) -> list[dict]:
    """Param groups for :class:`funcsam.SAMSGD` and :class:`funcsam.SAM` that perturb only the
    normalisation layers: ``[{"params": norm-layer params, "perturb": True, **group_options},
    {"params": the others, "perturb": False, **group_options}]``, in ``model.parameters()`` order.

    The group with ``perturb=False`` gets no perturbation and its gradients stay out of the norm, but
    it still descends with its gradient at w + e. An empty group is left out. ``group_options``
    (``rho``, ``lr``, ``weight_decay``, ...) go into both groups; ``params`` and ``perturb`` are ours.

    Raises:
        ValueError: the model has no parameter in a normalisation layer.
    """
    _check_model(model)
    taken = sorted({"params", "perturb"} & set(group_options))
    if taken:
        raise ValueError(f"{', '.join(taken)} cannot be a group option: sam_on_param_groups sets them itself")
    mask = norm_layer_mask(model)
    named = list(model.named_parameters())
    norm = [p for name, p in named if mask[name]]
    if not norm:
        kinds = ", ".join(kind.__name__ for kind in NORM_LAYERS)
        raise ValueError(f"{type(model).__name__} has no parameter in a normalisation layer ({kinds}): SAM-ON would "
                         "perturb nothing. Use plain SAM, or a model with affine normalisation layers")
    rest = [p for name, p in named if not mask[name]]
    groups = [dict(group_options, params=norm, perturb=True), dict(group_options, params=rest, perturb=False)]
    return [group for group in groups if group["params"]]


def perturb_mask_leaves(perturb_mask: PyTree | None, params: PyTree) -> tuple[bool, ...] | None:
    """``perturb_mask`` (a pytree of Python bools shaped like ``params``) as one bool per parameter
    leaf, in the leaves' (optree) order: the form the engine's ``SAMOptions.perturb_mask`` takes.
    None stays None (perturb every leaf).

    Raises:
        ValueError: the structure differs from ``params``'s, or no leaf is True.
        TypeError: a leaf is not a Python bool (a tensor would make the mask data-dependent).
    """
    if perturb_mask is None:
        return None
    leaves, spec = flatten(perturb_mask)
    param_leaves, param_spec = flatten(params)
    if len(leaves) != len(param_leaves) or not same_structure(spec, param_spec):
        raise ValueError(
            "perturb_mask must have the structure of params (one Python bool per parameter, e.g. "
            "funcsam.sam_on.norm_layer_mask(model) for params from model.named_parameters()); params has "
            f"{_some_paths(params)}, perturb_mask {_some_paths(perturb_mask)}"
        )
    for path, leaf in zip(leaf_paths(perturb_mask), leaves):
        if not isinstance(leaf, bool):
            raise TypeError(f"perturb_mask must hold Python bools, got {type(leaf).__name__} {leaf!r} at {path!r}")
    if not any(leaves):
        raise ValueError("perturb_mask is False everywhere: nothing would be perturbed. Mark the parameters to "
                         "perturb True, or pass rho=0 for the base step")
    return tuple(leaves)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _some_paths(tree: PyTree, shown: int = 6) -> str:
    paths = leaf_paths(tree)
    more = f", ... ({len(paths)} leaves)" if len(paths) > shown else ""
    return f"[{', '.join(paths[:shown])}{more}]"
