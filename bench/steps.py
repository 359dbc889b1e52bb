"""The training steps the benchmarks compare, on one ResNet-20-shaped CIFAR model and batch.

Every variant is a zero-argument callable that takes one full optimisation step on the same batch;
the state it carries (params, momentum) lives in its closure. ``torch.optim.SGD`` (eager) is the
baseline; "compiled SGD" is ``sam_step`` with the Python number rho = 0 (one pass) under
``torch.compile``, the fair compiled counterpart of a compiled SAM step.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

import funcsam
from train.models import resnet20

HYPER = dict(momentum=0.9, weight_decay=5e-4)
LR, RHO = 0.1, 0.05


def make_problem(batch_size: int = 128, device: str = "cpu", seed: int = 0, channels_last: bool = False):
    """ResNet-20 and one CIFAR-shaped batch; ``channels_last`` stores both NHWC (faster convolutions
    on this CPU's oneDNN kernels and on GPUs' tensor cores)."""
    torch.manual_seed(seed)
    model = resnet20().to(device)
    inputs = torch.randn(batch_size, 3, 32, 32, device=device)
    targets = torch.randint(0, 10, (batch_size,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return model, (inputs, targets)


def torch_sgd_step(model, batch) -> Callable[[], object]:
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, **HYPER)

    def step():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        return loss

    return step


def samsgd_step(model, batch) -> Callable[[], object]:
    model = copy.deepcopy(model)
    optimizer = funcsam.SAMSGD(model.parameters(), lr=LR, rho=RHO, model=model, **HYPER)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        return loss

    return lambda: optimizer.step(closure)


def functional_step(model, batch, *, rho, compile: bool) -> Callable[[], object]:
    model = copy.deepcopy(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    carry = {"params": params, "buffers": buffers, "state": funcsam.init_momentum(params)}
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    device = batch[0].device
    lr = torch.tensor(LR, device=device)
    rho_arg = rho if rho == 0 else torch.tensor(rho, device=device)

    def train_step(params, buffers, state, batch, lr, rho_arg):
        return funcsam.sam_step(params, buffers, batch, loss_fn, rho_arg, lr, state, **HYPER)

    run = torch.compile(train_step, fullgraph=True) if compile else train_step

    def step():
        out = run(carry["params"], carry["buffers"], carry["state"], batch, lr, rho_arg)
        carry.update(params=out.params, buffers=out.buffers, state=out.momentum_state)
        return out.loss

    return step


VARIANTS = {
    "torch.optim.SGD (eager)": lambda m, b: torch_sgd_step(m, b),
    "SAMSGD (eager)": lambda m, b: samsgd_step(m, b),
    "sam_step (eager)": lambda m, b: functional_step(m, b, rho=RHO, compile=False),
    "SGD via sam_step rho=0 (compiled)": lambda m, b: functional_step(m, b, rho=0.0, compile=True),
    "sam_step (compiled)": lambda m, b: functional_step(m, b, rho=RHO, compile=True),
}
