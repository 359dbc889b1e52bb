"""SAM in a plain PyTorch loop, functional style: ``funcsam.sam_step`` over a parameter dict.

    python examples/plain_functional.py --steps 300 [--accumulation 4]

The step is pure: it takes params, buffers, a batch, the loss function and the optimizer state, and
returns new ones (nothing is mutated, so it can be wrapped in torch.compile). ``make_loss_fn`` turns
the module and a criterion into ``loss_fn(params, buffers, batch)``. With ``--accumulation K`` each
batch is cut into K micro-batches (``funcsam.MicroBatches``): both passes accumulate over them, the
second at w + e, so the step equals the one on the whole batch with a K-th of its memory.
"""

from __future__ import annotations

import argparse

import torch.nn.functional as F

import funcsam
from toy_task import accuracy, argument_parser, batches, make_data, make_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argument_parser(__doc__.splitlines()[0], lr=0.05)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per batch (1: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    """Train the toy task's MLP; returns the model with the trained params loaded."""
    args = parse_args(argv)
    inputs, targets = make_data(args.seed)
    model = make_model(args.seed)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    base = funcsam.sgd(momentum=0.9, weight_decay=5e-4)  # torch.optim.SGD's update
    state = base.init(params)
    source = funcsam.MicroBatches() if args.accumulation > 1 else None

    for step, batch in enumerate(batches(inputs, targets, args.batch_size, args.steps, args.seed)):
        if source is not None:
            batch = funcsam.split_batch(batch, args.accumulation)
        out = funcsam.sam_step(params, buffers, batch, loss_fn, args.rho, args.lr, state, base=base, source=source)
        params, buffers, state = out.params, out.buffers, out.momentum_state
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss at w {out.loss.item():.4f}")
    model.load_state_dict({**params, **buffers})
    print(f"train accuracy {accuracy(model, inputs, targets):.3f}")
    return model


if __name__ == "__main__":
    main()
