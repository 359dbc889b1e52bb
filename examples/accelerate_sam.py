"""SAM in an ``accelerate`` loop: ``funcsam.SAM`` over AdamW, first/second-step style.

    python examples/accelerate_sam.py --steps 300 [--mixed-precision fp16|bf16] [--local-perturbation]
    accelerate launch --num_processes 2 examples/accelerate_sam.py --local-perturbation

Each step::

    backward at w                  (under accelerator.no_sync with --local-perturbation: each replica's own g)
    first_step: climb to w + e     e = rho * g / ||g||, g unscaled first under fp16 (accelerator.scaler)
    backward at w + e              all-reduced across replicas: every replica descends with the same g_sam
    second_step: back to w, clip g_sam, AdamW's step (skipped on an fp16 overflow), scaler.update()

Only the model goes through ``accelerator.prepare``: the optimizer's wrapper would step through
``GradScaler.step``, which knows nothing of the two halves, while ``funcsam.SAM`` takes the scaler
itself (``first_step``/``second_step(grad_scaler=...)``: it unscales, skips and records the
overflow for ``scaler.update()``).

Without ``--local-perturbation`` the first backward is all-reduced too, and every replica climbs
along the global g (SAM on the global batch); with it, each replica climbs along its own g
(m-sharpness with m = the number of processes, as in Foret et al. 2020).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from accelerate import Accelerator

import funcsam
from toy_task import accuracy, argument_parser, batches, make_data, make_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argument_parser(__doc__.splitlines()[0], lr=3e-3)  # --batch-size is per process
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--local-perturbation", action="store_true", help="each replica climbs along its own g")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even where a GPU is available")
    parser.add_argument("--save", default=None, help="write the trained model's state_dict here (main process)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    """Train the toy task's MLP; returns the trained (unwrapped) model."""
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    inputs, targets = make_data(args.seed)
    model = make_model(args.seed)
    model = accelerator.prepare(model)  # DDP across processes; autocast under mixed precision
    optimizer = funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=args.rho, lr=args.lr, weight_decay=0.01,
                            max_grad_norm=args.max_grad_norm)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.steps)
    scaler = accelerator.scaler  # a torch.amp.GradScaler under fp16 on a GPU, else None
    # Every process draws the same batches and keeps its own rows of each.
    rank, world = accelerator.process_index, accelerator.num_processes
    data = batches(inputs, targets, args.batch_size * world, args.steps, args.seed)

    for step, batch in enumerate(data):
        x, y = (part.to(accelerator.device) for part in funcsam.shard_batch(batch, rank, world))
        first_pass_sync = accelerator.no_sync(model) if args.local_perturbation else contextlib.nullcontext()
        with first_pass_sync:
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
        optimizer.first_step(zero_grad=True, grad_scaler=scaler)
        accelerator.backward(F.cross_entropy(model(x), y))
        optimizer.second_step(zero_grad=True, grad_scaler=scaler)
        if scaler is not None:
            scaler.update()
        scheduler.step()
        if step % 100 == 0 or step == args.steps - 1:
            accelerator.print(f"step {step:4d}  loss at w {loss.item():.4f}")
    model = accelerator.unwrap_model(model).cpu()
    accelerator.print(f"train accuracy {accuracy(model, inputs, targets):.3f}")
    if args.save and accelerator.is_main_process:
        torch.save(model.state_dict(), args.save)
    return model


if __name__ == "__main__":
    main()
