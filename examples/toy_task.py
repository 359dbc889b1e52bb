"""The toy task the plain-loop examples train on: 8 features, 4 classes, labels from a fixed random teacher.

Synthetic so that the examples run offline in seconds (300 SAM steps: 99 % train accuracy).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

FEATURES, CLASSES = 8, 4


def make_data(seed: int, examples: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs (examples, 8), targets (examples,))``: targets = argmax over classes of inputs @ W_teacher."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(examples, FEATURES, generator=generator)
    teacher = torch.randn(FEATURES, CLASSES, generator=generator)
    return inputs, (inputs @ teacher).argmax(dim=1)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, steps: int, seed: int) -> list:
    """``steps`` batches ``(inputs, targets)`` of ``batch_size`` examples, a fresh shuffle every epoch."""
    generator = torch.Generator().manual_seed(seed)
    out, order = [], torch.empty(0, dtype=torch.int64)
    while len(out) < steps:
        if len(order) < batch_size:
            order = torch.randperm(len(inputs), generator=generator)
        chosen, order = order[:batch_size], order[batch_size:]
        out.append((inputs[chosen], targets[chosen]))
    return out


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (model(inputs).argmax(dim=1) == targets).float().mean().item()


def argument_parser(description: str, *, lr: float) -> argparse.ArgumentParser:
    """The flags every toy-task example takes: --steps, --batch-size, --lr (default ``lr``), --rho, --seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    return parser
