"""SAM in a plain PyTorch loop, closure style: ``funcsam.SAMSGD`` as a drop-in for sam.pytorch.

    python examples/plain_closure.py --steps 300

``optimizer.step(closure)`` calls the closure twice: at w for the gradient g, then at w + e with
e = rho * g / ||g||; it comes back to w and takes torch.optim.SGD's step (momentum, weight decay)
with the gradient at w + e. The closure zeroes the gradients, computes the loss, calls backward and
returns the loss; ``step`` returns the loss at w.
"""

from __future__ import annotations

import argparse

import torch.nn.functional as F

import funcsam
from toy_task import accuracy, argument_parser, batches, make_data, make_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return argument_parser(__doc__.splitlines()[0], lr=0.05).parse_args(argv)


def main(argv: list[str] | None = None):
    """Train the toy task's MLP; returns the trained model."""
    args = parse_args(argv)
    inputs, targets = make_data(args.seed)
    model = make_model(args.seed)
    optimizer = funcsam.SAMSGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, rho=args.rho)

    for step, (x, y) in enumerate(batches(inputs, targets, args.batch_size, args.steps, args.seed)):
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss at w {loss.item():.4f}")
    print(f"train accuracy {accuracy(model, inputs, targets):.3f}")
    return model


if __name__ == "__main__":
    main()
