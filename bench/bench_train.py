"""End-to-end training throughput of ``python -m train.cifar10`` (images/s), interleaved.

Every configuration is a real trainer run in its own process (data on the device, augmentation,
both SAM passes, the update, the per-epoch eval and checkpoint), on the synthetic set so it runs
offline. Throughput is training images over training seconds of the epochs after the first (the
first includes torch.compile's compilation and warm-up), in wall time (images/s) and in the
process's CPU time (images per CPU-second, summed over its threads: on a shared machine this
counts the work done and not the waits for other tenants). Configurations are interleaved round by
round so that a noisy neighbour or thermal drift hits them all alike; the report takes medians.

    python -m bench.bench_train --model resnet20 --rounds 2 --steps 10 --out bench/results/train_cpu.json
    python -m bench.report_train bench/results/train_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# name -> trainer flags. "adapter" is the closure-style SAMSGD path (eager): the baseline that the
# compiled functional step is measured against; with --compile it is what a davda54/sam user does
# (torch.compile(model), the optimizer eager). The trainer stores channels_last unless "-nchw".
CONFIGS = {
    "sam-adapter-eager": ["--optim", "sam", "--api", "adapter"],
    "sam-functional-eager": ["--optim", "sam", "--api", "functional"],
    "sam-functional-compiled": ["--optim", "sam", "--api", "functional", "--compile"],
    "sam-adapter-compiled": ["--optim", "sam", "--api", "adapter", "--compile"],
    "sgd-adapter-eager": ["--optim", "sgd", "--api", "adapter"],
    "sgd-functional-eager": ["--optim", "sgd", "--api", "functional"],
    "sgd-functional-compiled": ["--optim", "sgd", "--api", "functional", "--compile"],
    "sgd-adapter-compiled": ["--optim", "sgd", "--api", "adapter", "--compile"],
    "sam-functional-compiled-nchw": ["--optim", "sam", "--api", "functional", "--compile", "--no-channels-last"],
    "sam-adapter-compiled-nchw": ["--optim", "sam", "--api", "adapter", "--compile", "--no-channels-last"],
    "sgd-adapter-compiled-nchw": ["--optim", "sgd", "--api", "adapter", "--compile", "--no-channels-last"],
}
DEFAULT_CONFIGS = ["sam-adapter-eager", "sam-functional-eager", "sam-functional-compiled", "sgd-adapter-eager",
                   "sgd-functional-eager", "sgd-functional-compiled"]


def run_trainer(flags: list[str], model: str, steps: int, epochs: int, batch_size: int, device: str,
                extra: list[str], threads: int | None = None) -> dict:
    """One trainer run; returns its steady-state images/s and per-epoch rows."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "train.cifar10", "--dataset", "synthetic", "--model", model,
            "--synthetic-size", str(steps * batch_size), "--batch-size", str(batch_size),
            "--epochs", str(epochs), "--warmup-epochs", "1", "--limit-steps", str(steps),
            "--device", device, "--out", out, *flags, *extra,
        ]
        started = time.perf_counter()
        env = dict(os.environ)
        if threads is not None:  # torch and inductor's OpenMP kernels both read it
            env["OMP_NUM_THREADS"] = str(threads)
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:]
    images = sum(r["images_per_s"] * r["train_seconds"] for r in steady)
    return dict(
        images_per_s=images / sum(r["train_seconds"] for r in steady),
        images_per_cpu_s=images / sum(r["train_cpu_seconds"] for r in steady),
        first_epoch_seconds=rows[0]["train_seconds"],
        wall_seconds=time.perf_counter() - started,
        command=" ".join(command[1:]),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    p.add_argument("--steps", type=int, default=10, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not timed")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="pass --amp to every run")
    p.add_argument("--no-channels-last", action="store_true", help="pass --no-channels-last to every run (NCHW)")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="pass --compile-mode to the compiled runs (reduce-overhead: CUDA graphs on a GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the runs. On a machine shared with other jobs, 1 avoids OpenMP "
                        "threads spinning at barriers for a descheduled sibling, which can slow a run 10x")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train.json")
    args = p.parse_args(argv)
    extra = (["--amp", args.amp] if args.amp else []) + (["--no-channels-last"] if args.no_channels_last else [])
    mode = ["--compile-mode", args.compile_mode] if args.compile_mode else []

    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    for round_index in range(args.rounds):
        for name in args.configs:
            flags = CONFIGS[name] + (mode if "--compile" in CONFIGS[name] else [])
            run = run_trainer(flags, args.model, args.steps, args.epochs, args.batch_size, args.device, extra,
                              args.threads)
            runs[name].append(run)
            print(f"round {round_index + 1}/{args.rounds}  {name:26s} {run['images_per_s']:8.1f} img/s  "
                  f"{run['images_per_cpu_s']:8.1f} img/cpu-s  "
                  f"(first epoch {run['first_epoch_seconds']:.1f}s, run {run['wall_seconds']:.0f}s)", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        model=args.model, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, device=args.device,
        amp=args.amp, compile_mode=args.compile_mode, rounds=args.rounds, torch=torch.__version__, machine=platform.processor() or platform.machine(),
        threads=args.threads or torch.get_num_threads(), argv=sys.argv[1:] if argv is None else argv, runs=runs,
    ), indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
