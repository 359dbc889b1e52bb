"""Interleaved step-time report: every variant runs once per round, so drift hits all alike.

    python -m bench.report [--rounds 15] [--batch-size 128] [--device cpu|cuda] [--skip-compiled]
                           [--memory-format contiguous|channels_last|both] [--base sgd|adamw|both]
                           [--only REGEX] [--amp bf16|fp16] [--memory | --memory-only] [--json PATH]

Prints a markdown table of median step times and the ratios the project tracks, funcsam's steps
against the peer ``pytorch_optimizer.SAM`` included (when it is installed). ``--memory`` adds each
step's peak memory in parameter copies over torch.optim.SGD's (bench.memory: the CUDA allocator's
counters, or the profiler's memory accounting on the CPU); ``--memory-only`` measures only that.
``--amp`` runs every step inside ``torch.autocast`` (the forward in bf16 or fp16, as a user who
wraps the training step in autocast; fp16 without loss scaling, which a timing does not need).
``--json`` also writes every figure to a file.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

from bench.memory import copies_over, parameter_bytes
from bench.steps import PEERS, VARIANTS, make_problem, peer_installed, variant_base

PEER, COMPILED_PEER = PEERS


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
    # the opt-out (make_loss_fn(..., memory_format=None): compute as stored), for the price of NCHW compute
    ("sam_step, memory_format=None (compiled)", "sam_step (compiled)", None),
    ("sam_step around compile(loss_fn) (compiled)", "compile(model) + torch.optim.SGD (compiled)", 2.00),
    ("sam_step around compile(loss_fn) (compiled)", "compile(model) + SAM(SGD) first/second step (compiled)", 1.00),
    # funcsam against the SAM a user would otherwise install (goal: no slower than it)
    (PEER, "torch.optim.SGD (eager)", 2.05),
    ("SAMSGD (eager)", PEER, 1.00),
    ("SAM(SGD) first/second step (eager)", PEER, 1.00),
    ("sam_step (eager)", PEER, 1.00),
    ("sam_step (compiled)", COMPILED_PEER, 1.00),
    ("sam_step around compile(loss_fn) (compiled)", COMPILED_PEER, 1.00),
    ("compile(model) + SAM(SGD) first/second step (compiled)", COMPILED_PEER, 1.00),
    ("SAM(AdamW) first/second step (eager)", "torch.optim.AdamW (eager)", 2.05),
    ("sam_step base=adamw (eager)", "torch.optim.AdamW (eager)", 2.05),
    ("sam_step base=adamw (compiled)", "compile(model) + torch.optim.AdamW (compiled)", 2.00),
    ("sam_step base=adamw (compiled)", "compile(model) + SAM(AdamW) first/second step (compiled)", 1.00),
    ("sam_step base=adamw, memory_format=None (compiled)", "sam_step base=adamw (compiled)", None),
    ("sam_step base=adamw around compile(loss_fn) (compiled)", "compile(model) + torch.optim.AdamW (compiled)", 2.00),
    ("sam_step base=adamw around compile(loss_fn) (compiled)",
     "compile(model) + SAM(AdamW) first/second step (compiled)", 1.00),
]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def under_autocast(step, device: str, amp: str | None):
    """``step`` called inside ``torch.autocast(device, dtype)`` for ``amp`` "bf16"/"fp16"; as is for None."""
    if amp is None:
        return step
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    def autocast_step():
        with torch.autocast(torch.device(device).type, dtype=dtype):
            return step()

    return autocast_step


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


def memory_table(names: list[str], layout: str, batch_size: int, device: str, amp: str | None) -> dict[str, dict]:
    """Every step's peak memory (bench.memory) in ``layout``, each built afresh on a new problem, in
    parameter copies over its SGD step's (eager: torch.optim.SGD's; compiled: compile(model) +
    torch.optim.SGD's); printed as a markdown table."""
    model, batch = make_problem(batch_size, device, channels_last=layout == "channels_last")
    makers = {name: (lambda name=name: under_autocast(VARIANTS[name](model, batch), device, amp))
              for name in dict.fromkeys([*map(memory_baseline, names), *names])}
    table = copies_over(makers, memory_baseline, parameter_bytes(model), device)
    print(f"\n[{layout}] peak memory, {parameter_bytes(model) / 2**20:.2f} MiB of parameters "
          "(goal: SAM <= 1 copy over its SGD step, the saved w)")
    print("| step | peak MiB | × parameters | copies over its SGD step | peak reached in |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, row in table.items():
        print(f"| {name} | {row['peak_mib']:.2f} | {row['copies']:.2f} | {row['copies_over_sgd']:.2f} | "
              f"{row['peak_at']} |")
    return table


MEMORY_BASELINES = {"eager": "torch.optim.SGD (eager)", "compiled": "compile(model) + torch.optim.SGD (compiled)"}


def memory_baseline(name: str) -> str:
    """The SGD step a step's memory is measured against: the compiled one for a compiled step."""
    return MEMORY_BASELINES["compiled" if "(compiled)" in name else "eager"]


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
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="run every step inside torch.autocast in this dtype")
    parser.add_argument("--memory", action="store_true",
                        help="also measure every step's peak memory (SGD-based steps; built afresh, after the timing)")
    parser.add_argument("--memory-only", action="store_true", help="measure the peak memory only, no timing")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures to PATH (JSON)")
    args = parser.parse_args(argv)

    # Every compiled functional variant is the same code object (bench.steps.functional_step's
    # train_step) over other closures: one graph each, past dynamo's default limit of 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    formats = ["contiguous", "channels_last"] if args.memory_format == "both" else [args.memory_format]
    bases = ["sgd", "adamw"] if args.base == "both" else [args.base]
    names = [n for n in VARIANTS if variant_base(n) in bases and not (args.skip_compiled and "compiled" in n)
             and (args.only is None or re.search(args.only, n)) and (n not in PEERS or peer_installed())]
    if not names:
        parser.error(f"no variant matches --only {args.only!r}; the variants are:\n  " + "\n  ".join(VARIANTS))
    if not peer_installed():
        print("pytorch_optimizer is not installed (pip install 'funcsam[bench]'): its SAM is left out", flush=True)
    results = dict(torch=torch.__version__, device=args.device, threads=torch.get_num_threads(),
                   batch_size=args.batch_size, model="resnet20", amp=args.amp)
    if not args.memory_only:
        results.update(time_report(names, formats, args))
        write_json(args.json, results)  # before the memory: a run cut short keeps its timings
    if args.memory or args.memory_only:
        memory_names = [n for n in names if variant_base(n) == "sgd"]
        results["memory"] = {layout: memory_table(memory_names, layout, args.batch_size, args.device, args.amp)
                             for layout in formats}
        write_json(args.json, results)


def write_json(path: Path | None, results: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(path)


def time_report(names: list[str], formats: list[str], args) -> dict:
    """Time every step of ``names`` in every layout of ``formats``, interleaved; print the tables and
    return the medians (ms) and the tracked ratios."""
    steps, problems = {}, {}
    for layout in formats:
        problems[layout] = make_problem(args.batch_size, args.device, channels_last=layout == "channels_last")
        for name in names:
            if layout == "channels_last" and "memory_format=None" in name:
                continue  # the same step as the plain one: stored channels_last, it computes so either way
            steps[f"{name} [{layout}]"] = under_autocast(VARIANTS[name](*problems[layout]), args.device, args.amp)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"ResNet-20, batch {args.batch_size}, {args.amp or 'fp32'}, {args.rounds} interleaved rounds", flush=True)
    times = time_interleaved(steps, args.rounds, args.warmup, args.device)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median[f"{names[0]} [{formats[0]}]"]

    print(f"\n| step | median ms | × {names[0]} [{formats[0]}] |")
    print("| --- | ---: | ---: |")
    for name in steps:
        print(f"| {name} | {1000 * median[name]:.1f} | {median[name] / base:.3f} |")
    ratios = []
    for layout in formats:
        m = {name: median[f"{name} [{layout}]"] for name in names if f"{name} [{layout}]" in median}
        print(f"\n[{layout}]")
        for name, over, goal in RATIOS:
            if name in m and over in m:
                print(f"{name} / {over}: {m[name] / m[over]:.3f}" + ("" if goal is None else f"   (goal <= {goal})"))
                ratios.append(dict(layout=layout, step=name, over=over, ratio=m[name] / m[over], goal=goal))
    return dict(rounds=args.rounds, median_ms={name: 1000 * t for name, t in median.items()}, ratios=ratios)


if __name__ == "__main__":
    main()
