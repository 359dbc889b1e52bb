"""Adam and AdamW, with torch.optim.Adam's / AdamW's exact semantics, on flat leaf lists.

    t   = count + 1
    g   = g + weight_decay * w                       Adam (coupled L2)
    w   = w * (1 - lr * weight_decay)                AdamW (decoupled), before the moments
    m   = beta1 * m + (1 - beta1) * g
    v   = beta2 * v + (1 - beta2) * g^2
    v̂   = max(v̂, v)  (amsgrad)   or   v
    w   = w - lr / (1 - beta1^t) * m / (sqrt(v̂) / sqrt(1 - beta2^t) + eps)

``count`` is the number of steps applied before this one (a 0-dim tensor), so the bias corrections
need no host sync and a schedule of tensor ``lr`` values never recompiles.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .tree import Tensor


def adam_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    count: Tensor,
    lr: float | Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor] | None]:
    """``(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)`` after one step. Pure: inputs are untouched.

    ``max_exp_avg_sqs`` is None without amsgrad. ``lr`` may be a float or a 0-dim tensor.
    """
    params, grads = list(params), list(grads)
    if weight_decay != 0:
        if decoupled:
            params = torch._foreach_mul(params, 1 - lr * weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    exp_avgs = torch._foreach_lerp(list(exp_avgs), grads, 1 - beta1)
    exp_avg_sqs = torch._foreach_mul(list(exp_avg_sqs), beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    if max_exp_avg_sqs is not None:
        max_exp_avg_sqs = torch._foreach_maximum(list(max_exp_avg_sqs), exp_avg_sqs)

    step = (count + 1).to(torch.float32)
    bias_correction1 = _bias_correction(beta1, step)
    bias_correction2_sqrt = torch.sqrt(_bias_correction(beta2, step))
    denominators = torch._foreach_sqrt(exp_avg_sqs if max_exp_avg_sqs is None else max_exp_avg_sqs)
    torch._foreach_mul_(denominators, 1 / bias_correction2_sqrt)
    torch._foreach_add_(denominators, eps)
    updates = torch._foreach_div(exp_avgs, denominators)
    torch._foreach_mul_(updates, lr / bias_correction1)
    return torch._foreach_sub(params, updates), exp_avgs, exp_avg_sqs, max_exp_avg_sqs


def _bias_correction(beta: float, step: Tensor) -> Tensor:
    """1 - beta^step, as -expm1(step * log(beta)): accurate in float32 even where beta^step is close
    to 1 (beta2 = 0.999 early in training), where 1 - pow(beta, step) would lose five digits."""
    if beta == 0:
        return torch.ones_like(step)
    return -torch.expm1(step * math.log(beta))
