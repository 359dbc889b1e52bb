"""The training steps the benchmarks compare, on one ResNet-20-shaped CIFAR model and batch.

Every variant is a zero-argument callable that takes one full optimisation step on the same batch;
the state it carries (params, momentum) lives in its closure. ``torch.optim.SGD`` (eager) is the
baseline; "compiled SGD" is ``sam_step`` with the Python number rho = 0 (one pass) under
``torch.compile``, the fair compiled counterpart of a compiled SAM step. The peer is
``pytorch_optimizer.SAM`` (PyPI ``pytorch_optimizer``, the ``bench`` extra), eager and around
``torch.compile(model)``; :data:`PEERS` names its variants, left out when the package is missing.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

import funcsam
from train.models import resnet20

# The recipes: the sam.pytorch one for SGD, a ViT-style one for AdamW (same lr for every variant).
RECIPES = {
    "sgd": dict(torch=torch.optim.SGD, funcsam=funcsam.sgd, lr=0.1, hyper=dict(momentum=0.9, weight_decay=5e-4)),
    "adamw": dict(torch=torch.optim.AdamW, funcsam=funcsam.adamw, lr=1e-3, hyper=dict(weight_decay=0.05)),
}
HYPER = RECIPES["sgd"]["hyper"]
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


def torch_step(model, batch, base: str = "sgd", compile_model: bool = False) -> Callable[[], object]:
    """The base optimizer alone (torch.optim.SGD or AdamW): the baseline of every ratio; with
    ``compile_model``, the forward is ``torch.compile(model)`` (the optimizer stays eager)."""
    model = copy.deepcopy(model)
    forward = torch.compile(model) if compile_model else model
    recipe = RECIPES[base]
    optimizer = recipe["torch"](model.parameters(), lr=recipe["lr"], **recipe["hyper"])

    def step():
        optimizer.zero_grad()
        loss = F.cross_entropy(forward(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        return loss

    return step


def torch_sgd_step(model, batch) -> Callable[[], object]:
    return torch_step(model, batch, "sgd")


def samsgd_step(model, batch) -> Callable[[], object]:
    model = copy.deepcopy(model)
    optimizer = funcsam.SAMSGD(model.parameters(), lr=LR, rho=RHO, model=model, **HYPER)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        return loss

    return lambda: optimizer.step(closure)


def sam_adapter_step(model, batch, base: str = "sgd", compile_model: bool = False) -> Callable[[], object]:
    """``funcsam.SAM`` over the torch.optim optimizer, in davda54's first/second-step style; with
    ``compile_model``, what a davda54 user compiles: ``torch.compile(model)``, the optimizer eager."""
    model = copy.deepcopy(model)
    forward = torch.compile(model) if compile_model else model
    recipe = RECIPES[base]
    optimizer = funcsam.SAM(model.parameters(), recipe["torch"], rho=RHO, model=model, lr=recipe["lr"],
                            **recipe["hyper"])

    def step():
        loss = F.cross_entropy(forward(batch[0]), batch[1])
        loss.backward()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(forward(batch[0]), batch[1]).backward()
        optimizer.second_step(zero_grad=True)
        return loss

    return step


def peer_sam_step(model, batch, compile_model: bool = False) -> Callable[[], object]:
    """``pytorch_optimizer.SAM`` over torch.optim.SGD, the SAM a user would otherwise install, used as its
    docstring shows: the backward at w, then ``step(closure)`` (perturb, the closure's backward at w + e,
    come back, descend). With ``compile_model``, the forward is ``torch.compile(model)``. It updates the
    BatchNorm running statistics in both passes (funcsam's ``model=`` keeps the first pass's)."""
    from pytorch_optimizer import SAM as PeerSAM  # the bench extra; imported here so bench.steps needs it only for this

    model = copy.deepcopy(model)
    forward = torch.compile(model) if compile_model else model
    optimizer = PeerSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, **HYPER)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(forward(batch[0]), batch[1])
        loss.backward()
        return loss

    def step():
        loss = closure()
        optimizer.step(closure)
        return loss

    return step


def functional_step(model, batch, *, rho, compile: bool, base: str = "sgd", compile_loss: bool = False,
                    loss_memory_format: torch.memory_format | str | None = "auto") -> Callable[[], object]:
    """``sam_step`` compiled whole (``compile``), or eager around a compiled loss function
    (``compile_loss``: forward and backward one training graph each pass, as ``torch.compile(model)``);
    ``loss_memory_format`` goes to ``make_loss_fn`` (the forward computes in it, whatever the storage)."""
    model = copy.deepcopy(model)
    recipe = RECIPES[base]
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    base_optimizer = recipe["funcsam"](**recipe["hyper"])
    carry = {"params": params, "buffers": buffers, "state": base_optimizer.init(params)}
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy, memory_format=loss_memory_format)
    if compile_loss:
        loss_fn = torch.compile(loss_fn)
    device = batch[0].device
    lr = torch.tensor(recipe["lr"], device=device)
    rho_arg = rho if rho == 0 else torch.tensor(rho, device=device)

    def train_step(params, buffers, state, batch, lr, rho_arg):
        return funcsam.sam_step(params, buffers, batch, loss_fn, rho_arg, lr, state, base=base_optimizer)

    run = torch.compile(train_step, fullgraph=True) if compile else train_step

    def step():
        out = run(carry["params"], carry["buffers"], carry["state"], batch, lr, rho_arg)
        carry.update(params=out.params, buffers=out.buffers, state=out.momentum_state)
        return out.loss

    return step


VARIANTS = {
    "torch.optim.SGD (eager)": lambda m, b: torch_step(m, b, "sgd"),
    "SAMSGD (eager)": lambda m, b: samsgd_step(m, b),
    "SAM(SGD) first/second step (eager)": lambda m, b: sam_adapter_step(m, b, "sgd"),
    "sam_step (eager)": lambda m, b: functional_step(m, b, rho=RHO, compile=False),
    "SGD via sam_step rho=0 (compiled)": lambda m, b: functional_step(m, b, rho=0.0, compile=True),
    "sam_step (compiled)": lambda m, b: functional_step(m, b, rho=RHO, compile=True),
    "sam_step, memory_format=None (compiled)": lambda m, b: functional_step(
        m, b, rho=RHO, compile=True, loss_memory_format=None),
    "sam_step around compile(loss_fn) (compiled)": lambda m, b: functional_step(m, b, rho=RHO, compile=False,
                                                                               compile_loss=True),
    "compile(model) + torch.optim.SGD (compiled)": lambda m, b: torch_step(m, b, "sgd", compile_model=True),
    "compile(model) + SAM(SGD) first/second step (compiled)": lambda m, b: sam_adapter_step(m, b, "sgd", True),
    "pytorch_optimizer.SAM(SGD) (eager)": lambda m, b: peer_sam_step(m, b),
    "compile(model) + pytorch_optimizer.SAM(SGD) (compiled)": lambda m, b: peer_sam_step(m, b, compile_model=True),
    "torch.optim.AdamW (eager)": lambda m, b: torch_step(m, b, "adamw"),
    "SAM(AdamW) first/second step (eager)": lambda m, b: sam_adapter_step(m, b, "adamw"),
    "sam_step base=adamw (eager)": lambda m, b: functional_step(m, b, rho=RHO, compile=False, base="adamw"),
    "AdamW via sam_step rho=0 base=adamw (compiled)": lambda m, b: functional_step(m, b, rho=0.0, compile=True,
                                                                                     base="adamw"),
    "sam_step base=adamw (compiled)": lambda m, b: functional_step(m, b, rho=RHO, compile=True, base="adamw"),
    "sam_step base=adamw, memory_format=None (compiled)": lambda m, b: functional_step(
        m, b, rho=RHO, compile=True, base="adamw", loss_memory_format=None),
    "sam_step base=adamw around compile(loss_fn) (compiled)": lambda m, b: functional_step(
        m, b, rho=RHO, compile=False, base="adamw", compile_loss=True),
    "compile(model) + torch.optim.AdamW (compiled)": lambda m, b: torch_step(m, b, "adamw", compile_model=True),
    "compile(model) + SAM(AdamW) first/second step (compiled)": lambda m, b: sam_adapter_step(m, b, "adamw", True),
}


PEERS = [name for name in VARIANTS if "pytorch_optimizer" in name]


def peer_installed() -> bool:
    """Whether ``pytorch_optimizer`` (the peer's package, in the ``bench`` extra) can be imported."""
    return importlib.util.find_spec("pytorch_optimizer") is not None


def variant_base(name: str) -> str:
    """The base optimizer a variant of :data:`VARIANTS` steps with: ``"sgd"`` or ``"adamw"``."""
    return "adamw" if "adamw" in name.lower() else "sgd"
