"""m-sharpness step time: ``funcsam.MSharpness`` (vmap over the parts) against a Python loop over them.

    python bench/bench_msharpness.py [--model resnet20|tiny] [--batch-size 128] [--parts 1 2 4 8]
                                     [--rounds 5] [--threads N] [--device cpu|cuda]

Both variants compute the same step (checked before timing); the loop runs the two gradient passes
of each part one after another, vmap runs each pass once over all parts. Variants are interleaved
round by round so that drift hits all alike; the table shows median seconds per step.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import funcsam
from bench.report import time_interleaved
from funcsam.sources import FirstPass, MSharpness
from train.models import build_model

HYPER = dict(momentum=0.9, weight_decay=5e-4)
LR, RHO = 0.1, 0.05


class LoopedParts(MSharpness):
    """The baseline: ``MSharpness(m)``'s two passes as a Python loop over the parts (a gradient source
    of funcsam's protocol, plugged into the same ``sam_step``)."""

    def first_pass(self, gradient, point, buffers, batch):
        parts = [gradient(point, buffers, part) for part in funcsam.split_batch(batch, self.m)]
        units = [grads for grads, _ in parts]
        losses, part_buffers, auxes = zip(*[aux for _, aux in parts])
        stacked = {k: torch.stack([b[k] for b in part_buffers]) for k in buffers}
        mean = {k: v.mean(0) if v.is_floating_point() else v[0] for k, v in stacked.items()}
        return FirstPass(units, torch.stack(losses).mean(), mean, torch.cat(auxes))

    def second_pass(self, gradient, leaves, perturbations, buffers, batch):
        sam_grads = None
        for part, e in zip(funcsam.split_batch(batch, self.m), perturbations):
            part_sam_grads = gradient(torch._foreach_add(leaves, e), buffers, part)[0]
            sam_grads = (torch._foreach_div(part_sam_grads, self.m) if sam_grads is None
                         else torch._foreach_add(sam_grads, part_sam_grads, alpha=1 / self.m))
        return sam_grads


def loop_over_parts_step(params, buffers, batch, loss_fn, rho, lr, state, *, m):
    return funcsam.sam_step(params, buffers, batch, loss_fn, rho, lr, state, source=LoopedParts(m), **HYPER)


def make_variant(step_fn, params, buffers, batch, loss_fn, m):
    carry = {"params": params, "buffers": buffers, "state": funcsam.init_momentum(params)}

    def step():
        out = step_fn(carry["params"], carry["buffers"], batch, loss_fn, RHO, LR, carry["state"], m=m)
        new_params, new_buffers, new_state = out[:3]
        carry.update(params=new_params, buffers=new_buffers, state=new_state)
        if batch[0].is_cuda:
            torch.cuda.synchronize()

    return step


def vmap_step(params, buffers, batch, loss_fn, rho, lr, state, *, m):
    return funcsam.sam_step(params, buffers, batch, loss_fn, rho, lr, state, source=funcsam.MSharpness(m), **HYPER)


def check_same_step(params, buffers, batch, loss_fn, m) -> float:
    state = funcsam.init_momentum(params)
    a = vmap_step(params, buffers, batch, loss_fn, RHO, LR, state, m=m).params
    b = loop_over_parts_step(params, buffers, batch, loss_fn, RHO, LR, state, m=m)[0]
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model(args.model, 10).to(args.device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    batch = (torch.randn(args.batch_size, 3, 32, 32, device=args.device),
             torch.randint(0, 10, (args.batch_size,), device=args.device))
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)

    steps = {}
    for m in args.parts:
        print(f"m={m}: max |vmap - loop| after one step = {check_same_step(params, buffers, batch, loss_fn, m):.1e}",
              flush=True)
        steps[("vmap", m)] = make_variant(vmap_step, params, buffers, batch, loss_fn, m)
        steps[("loop", m)] = make_variant(loop_over_parts_step, params, buffers, batch, loss_fn, m)
    times = time_interleaved(steps, args.rounds, warmup=1, device=args.device)

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"\n{args.model}, batch {args.batch_size}, {where}, "
          f"median of {args.rounds} rounds (s/step)\n")
    print("| parts m | vmap | Python loop | loop / vmap |")
    print("|---:|---:|---:|---:|")
    for m in args.parts:
        vmap_s, loop_s = statistics.median(times[("vmap", m)]), statistics.median(times[("loop", m)])
        print(f"| {m} | {vmap_s:.3f} | {loop_s:.3f} | {loop_s / vmap_s:.2f}x |")


if __name__ == "__main__":
    main()
