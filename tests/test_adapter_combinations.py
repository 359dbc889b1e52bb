"""The adapters' modes with SAM-ON param groups, clipping or fp16 loss scaling, one feature at a time,
each against ``funcsam.sam_step`` with the same mode object and the same feature (``perturb_mask``,
``max_grad_norm``, ``loss_scale``)."""

import copy

import torch

import funcsam
from funcsam import AESAM, GSAM, MSAM, LookSAM
from helpers import (
    adapter_steps, assert_trees_close, bn_convnet, cartesian, classification_batches, mlp, params_and_buffers,
    run_sam_step_with_base,
)

RHO, STEPS = 0.1, 4
MODES = {"gsam": GSAM(alpha=0.5), "msam": MSAM(), "looksam(2)": LookSAM(k=2), "every(2)": funcsam.every(2),
         "aesam": AESAM(total_steps=STEPS)}
# name: (the adapter over params with extra keywords, the same base optimizer as a pure part, lr)
ADAPTERS = {
    "samsgd": (lambda params, **kw: funcsam.SAMSGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, rho=RHO, **kw),
               lambda: funcsam.sgd(momentum=0.9, weight_decay=5e-4), 0.1),
    "sam_adamw": (lambda params, **kw: funcsam.SAM(params, torch.optim.AdamW, rho=RHO, lr=1e-2, weight_decay=0.05,
                                                   **kw),
                  lambda: funcsam.adamw(weight_decay=0.05), 1e-2),
}


def _convnet_and_batches():
    batches = classification_batches(STEPS, 6, (3, 5, 5))
    return bn_convnet().double(), [(x.double(), y) for x, y in batches]


def adapted(adapter, model, batches, mode, *, groups=None, scaler=None, **kwargs):
    """``(params, buffers, optimizer)`` of a copy of ``model`` trained by the adapter in the closure style,
    under fp16 autocast with ``scaler``'s loss scaling when one is given."""
    model = copy.deepcopy(model)
    params = model.parameters() if groups is None else groups(model)
    optimizer = ADAPTERS[adapter][0](params, mode=mode, model=model, **kwargs)
    adapter_steps(model, optimizer, batches, "closure", scaler=scaler,
                  autocast_dtype=None if scaler is None else torch.float16)
    return (*params_and_buffers(model), optimizer)


def functional(adapter, model, batches, mode, **options):
    base, lr = ADAPTERS[adapter][1](), ADAPTERS[adapter][2]
    return run_sam_step_with_base(model, batches, rho=RHO, lr=lr, base=base, mode=mode, **options)


def _differ(a: dict, b: dict, by: float) -> bool:
    return max(float((a[k] - b[k]).abs().max()) for k in a) > by


@cartesian(mode_name=list(MODES), adapter=list(ADAPTERS))
def test_mode_with_sam_on_param_groups_equals_sam_step_with_perturb_mask(mode_name, adapter):
    mode, (model, batches) = MODES[mode_name], _convnet_and_batches()
    expected, expected_buffers, _ = functional(adapter, model, batches, mode,
                                               perturb_mask=funcsam.norm_layer_mask(model))
    params, buffers, _ = adapted(adapter, model, batches, mode, groups=funcsam.sam_on_param_groups)
    assert_trees_close(params, expected, atol=1e-6)
    assert_trees_close(buffers, expected_buffers, atol=1e-6)
    assert _differ(expected, functional(adapter, model, batches, mode)[0], by=1e-6)  # SAM-ON changed the steps


@cartesian(mode_name=list(MODES), adapter=list(ADAPTERS))
def test_mode_with_max_grad_norm_equals_sam_step_with_max_grad_norm(mode_name, adapter):
    mode, (model, batches) = MODES[mode_name], _convnet_and_batches()
    expected, expected_buffers, _ = functional(adapter, model, batches, mode, max_grad_norm=0.1)
    params, buffers, _ = adapted(adapter, model, batches, mode, max_grad_norm=0.1)
    assert_trees_close(params, expected, atol=1e-6)
    assert_trees_close(buffers, expected_buffers, atol=1e-6)
    assert _differ(expected, functional(adapter, model, batches, mode)[0], by=1e-6)  # clipping was active


@cartesian(mode_name=list(MODES), adapter=list(ADAPTERS))
def test_mode_with_grad_scaler_equals_sam_step_with_loss_scale(mode_name, adapter):
    mode, model, batches = MODES[mode_name], mlp(), classification_batches(STEPS, 8, (6,))
    loss_scale = funcsam.init_loss_scale(2.0**10, growth_interval=3)  # grows once, after step 2
    expected, _, _ = functional(adapter, model, batches, mode, loss_scale=loss_scale, autocast_dtype=torch.float16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    params, _, optimizer = adapted(adapter, model, batches, mode, scaler=scaler)
    assert bool(optimizer.last_step_finite) and scaler.get_scale() == 2.0**11
    assert_trees_close(params, expected, atol=1e-6)
