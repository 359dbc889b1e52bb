"""Interleaved step-time report: every variant runs once per round, so drift hits all alike.

    python -m bench.report [--rounds 15] [--batch-size 128] [--device cpu|cuda] [--skip-compiled]
                           [--memory-format contiguous|channels_last|both] [--base sgd|adamw|both]
                           [--only REGEX]

Prints a markdown table of median step times and the ratios the project tracks, and, on CUDA, the
peak-memory overhead of SAMSGD over torch.optim.SGD in parameter copies.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import torch

from bench.steps import VARIANTS, make_problem, samsgd_step, torch_sgd_step, variant_base


# (step, the step it is measured against, the goal for the ratio)
RATIOS = [
    ("SAMSGD (eager)", "torch.optim.SGD (eager)", 2.00),
    ("SAM(SGD) first/second step (eager)", "torch.optim.SGD (eager)", 2.00),
    ("sam_step (eager)", "torch.optim.SGD (eager)", 2.05),
    ("sam_step (compiled)", "SGD via sam_step rho=0 (compiled)", 2.02),
    ("sam_step (compiled)", "torch.optim.SGD (eager)", 1.5),
    ("sam_step (compiled)", "compile(model) + torch.optim.SGD (compiled)", 2.00),
    ("compile(model) + SAM(SGD) first/second step (compiled)", "compile(model) + torch.optim.SGD (compiled)", 2.00),
    ("sam_step (compiled)", "compile(model) + SAM(SGD) first/second step (compiled)", 1.00),
    ("sam_step, loss in channels_last (compiled)", "compile(model) + torch.optim.SGD (compiled)", 2.00),
    ("sam_step, loss in channels_last (compiled)", "compile(model) + SAM(SGD) first/second step (compiled)", 1.00),
    ("sam_step around compile(loss_fn) (compiled)", "compile(model) + torch.optim.SGD (compiled)", 2.00),
    ("sam_step around compile(loss_fn) (compiled)", "compile(model) + SAM(SGD) first/second step (compiled)", 1.00),
    ("SAM(AdamW) first/second step (eager)", "torch.optim.AdamW (eager)", 2.05),
    ("sam_step base=adamw (eager)", "torch.optim.AdamW (eager)", 2.05),
    ("sam_step base=adamw (compiled)", "compile(model) + torch.optim.AdamW (compiled)", 2.00),
    ("sam_step base=adamw (compiled)", "compile(model) + SAM(AdamW) first/second step (compiled)", 1.00),
    ("sam_step base=adamw, loss in channels_last (compiled)", "compile(model) + torch.optim.AdamW (compiled)", 2.00),
    ("sam_step base=adamw, loss in channels_last (compiled)",
     "compile(model) + SAM(AdamW) first/second step (compiled)", 1.00),
    ("sam_step base=adamw around compile(loss_fn) (compiled)", "compile(model) + torch.optim.AdamW (compiled)", 2.00),
    ("sam_step base=adamw around compile(loss_fn) (compiled)",
     "compile(model) + SAM(AdamW) first/second step (compiled)", 1.00),
]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps: dict, rounds: int, warmup: int, device: str) -> dict[str, list[float]]:
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(device)
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def peak_memory_overhead(model, batch) -> float:
    """(peak of a SAMSGD step - peak of an SGD step) / bytes of the parameters, on CUDA."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peaks = {}
    for name, make in (("sgd", torch_sgd_step), ("samsgd", samsgd_step)):
        step = make(model, batch)
        step()  # momentum buffers exist from here on, as in training
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        del step
    return (peaks["samsgd"] - peaks["sgd"]) / param_bytes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-compiled", action="store_true", help="eager variants only (no 2-minute compiles)")
    parser.add_argument("--base", default="sgd", choices=["sgd", "adamw", "both"],
                        help="the base optimizer of the variants (both: SGD's and AdamW's, interleaved)")
    parser.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last", "both"],
                        help="layout of the model and batch (both: every variant in each layout, interleaved)")
    parser.add_argument("--only", metavar="REGEX",
                        help="only the variants whose name matches (re.search), e.g. 'compile' or 'AdamW'")
    args = parser.parse_args(argv)

    # Every compiled functional variant is the same code object (bench.steps.functional_step's
    # train_step) over other closures: one graph each, past dynamo's default limit of 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    formats = ["contiguous", "channels_last"] if args.memory_format == "both" else [args.memory_format]
    bases = ["sgd", "adamw"] if args.base == "both" else [args.base]
    names = [n for n in VARIANTS if variant_base(n) in bases and not (args.skip_compiled and "compiled" in n)
             and (args.only is None or re.search(args.only, n))]
    if not names:
        parser.error(f"no variant matches --only {args.only!r}; the variants are:\n  " + "\n  ".join(VARIANTS))
    steps, problems = {}, {}
    for layout in formats:
        problems[layout] = make_problem(args.batch_size, args.device, channels_last=layout == "channels_last")
        for name in names:
            if layout == "channels_last" and "loss in channels_last" in name:
                continue  # the same step as the plain one: its tensors are channels_last already
            steps[f"{name} [{layout}]"] = VARIANTS[name](*problems[layout])
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"ResNet-20, batch {args.batch_size}, {args.rounds} interleaved rounds", flush=True)
    times = time_interleaved(steps, args.rounds, args.warmup, args.device)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median[f"{names[0]} [{formats[0]}]"]

    print(f"\n| step | median ms | × {names[0]} [{formats[0]}] |")
    print("| --- | ---: | ---: |")
    for name in steps:
        print(f"| {name} | {1000 * median[name]:.1f} | {median[name] / base:.3f} |")
    for layout in formats:
        m = {name: median[f"{name} [{layout}]"] for name in names if f"{name} [{layout}]" in median}
        print(f"\n[{layout}]")
        for name, over, goal in RATIOS:
            if name in m and over in m:
                print(f"{name} / {over}: {m[name] / m[over]:.3f}   (goal <= {goal})")
    if args.device == "cuda":
        for layout in formats:
            overhead = peak_memory_overhead(*problems[layout])
            print(f"SAMSGD peak memory over SGD [{layout}]: {overhead:.2f} parameter copies   (goal <= 1)")


if __name__ == "__main__":
    main()
