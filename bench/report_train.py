"""Print the training-throughput table of a ``bench.bench_train`` result, with its ratios.

    python -m bench.report_train bench/results/train_cpu.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def ratio_line(label: str, numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return f"  {label:52s}     n/a"
    return f"  {label:52s} {numerator / denominator:6.2f}x"


def ratios(speed: dict[str, float]) -> list[str]:
    get = speed.get
    return [
        ratio_line("SAM / SGD, functional eager", get("sam-functional-eager"), get("sgd-functional-eager")),
        ratio_line("SAM / SGD, functional compiled", get("sam-functional-compiled"), get("sgd-functional-compiled")),
        ratio_line("SAM / SGD, adapter eager", get("sam-adapter-eager"), get("sgd-adapter-eager")),
        ratio_line("compiled / eager, SAM functional", get("sam-functional-compiled"), get("sam-functional-eager")),
        ratio_line("compiled / eager, SGD functional", get("sgd-functional-compiled"), get("sgd-functional-eager")),
        ratio_line("functional eager / adapter eager, SAM", get("sam-functional-eager"), get("sam-adapter-eager")),
        ratio_line("compiled SAM / eager SAM via --api adapter (aim >= 1.3)",
                   get("sam-functional-compiled"), get("sam-adapter-eager")),
    ]


def report(result: dict) -> str:
    runs = {name: r for name, r in result["runs"].items() if r}
    wall = {name: median_of(r, "images_per_s") for name, r in runs.items()}
    cpu = {name: median_of(r, "images_per_cpu_s") for name, r in runs.items()}
    lines = [
        f"{result['model']} on {result['device']} ({result['machine']}, {result['threads']} threads, torch "
        f"{result['torch']}), batch {result['batch_size']}, {result['steps']} steps x {result['epochs'] - 1} timed "
        f"epochs, amp={result['amp']}, median of {result['rounds']} interleaved rounds",
        "",
        f"  {'configuration':26s} {'images/s':>9s} {'img/CPU-s':>10s}   images/s of every round",
    ]
    for name, r in runs.items():
        every = ", ".join(f"{x['images_per_s']:.0f}" for x in r)
        lines.append(f"  {name:26s} {wall[name]:9.1f} {cpu[name]:10.1f}   [{every}]")
    lines += ["", "ratios of wall-clock images/s:", *ratios(wall),
              "", "ratios of images per CPU-second (robust to other tenants on a shared machine):", *ratios(cpu)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or ["bench/results/train.json"]
    for path in paths:
        print(report(json.loads(Path(path).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
