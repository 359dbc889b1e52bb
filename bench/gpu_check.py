"""Everything a lent GPU should tell us, in one call, into one results file.

    bench/gpu_check.sh OUT_DIR                      # on the GPU machine: at most 7.5 minutes
    python -m bench.gpu_check OUT_DIR [--budget-s 450] [--only STAGE ...]
    python -m bench.gpu_check OUT_DIR --device cpu --tiny   # the same stages, tiny and eager (a test)
    python -m bench.gpu_check OUT_DIR --dry-run             # the plan only: every stage's command

Stages, in order of priority (each a subprocess with its own time limit, cut to what is left of
``--budget-s``; a stage that no longer fits is recorded as skipped):

    environment     the card, driver and memory (nvidia-smi), torch and its CUDA, the load (uptime)
    warm_caches     one-step trainer runs of every train_* configuration, all at once, beside
                    cuda_tests: they fill torch.compile's caches (FX graphs, AOT autograd), so the
                    timed trainer runs below compile in seconds; waited for before report_fp32
    cuda_tests      pytest tests/test_cuda.py (the functional step and the adapters on the GPU)
    report_fp32     bench.report --device cuda: eager and compiled steps interleaved, the peer
                    pytorch_optimizer.SAM included, and each step's peak memory (CUDA allocator)
    train_*         bench.bench_train: the trainer's images/s with --compile, ResNet-20 and WRN-28-10,
                    --amp bf16 and fp16, and bf16 with --compile-mode reduce-overhead (CUDA graphs)
    report_bf16     bench.report --amp bf16: the same steps under autocast (compiled ones only)

Everything lands in ``OUT_DIR/gpu_check.json``, rewritten after every stage, so a call cut short
keeps what it measured (rerun the skipped stages with ``--only``)::

    {"environment": {...}, "budget_s": ..., "stages": {name: {"command", "status" (ok, failed,
     timed out, skipped), "returncode", "wall_s", "output_tail", "results"}}}

where ``results`` is what the stage's own ``--json``/``--out`` file held.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_NAME = "gpu_check.json"
# The report's steps over SGD that a GPU answers for: every eager one, the whole step compiled, the
# compiled base step, and torch.compile(model) with SGD, funcsam.SAM and the peer.
REPORT_ONLY = ("^torch\\.optim\\.SGD|^SAMSGD|first/second step|^sam_step \\((eager|compiled)\\)|pytorch_optimizer"
               "|^SGD via sam_step|compile\\(model\\) \\+ torch\\.optim\\.SGD")
TRAIN_RUNS = [  # (stage, model, amp, compile mode); CUDA graphs right after their bf16 run: its compiled code is cached
    ("train_resnet20_bf16", "resnet20", "bf16", "default"),
    ("train_resnet20_bf16_cudagraphs", "resnet20", "bf16", "reduce-overhead"),
    ("train_wrn28_10_bf16", "wrn28_10", "bf16", "default"),
    ("train_wrn28_10_bf16_cudagraphs", "wrn28_10", "bf16", "reduce-overhead"),
    ("train_resnet20_fp16", "resnet20", "fp16", "default"),
    ("train_wrn28_10_fp16", "wrn28_10", "fp16", "default"),
]
MIN_STAGE_S = 20  # a stage given less than this is skipped rather than started
WARM_LIMIT_S = 240  # the one-step runs that fill the compile caches, all at once


def plan(out: Path, device: str, tiny: bool) -> dict[str, dict]:
    """Every stage after the environment: ``{name: {"argv": [...], "limit_s": s, "results": path or None}}``."""
    python = sys.executable
    stages = {"cuda_tests": dict(argv=[python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                                 limit_s=90, results=None)}
    report = [python, "-m", "bench.report", "--device", device, "--memory"]
    if tiny:  # eager, two images, one round: the plumbing, not the figures
        report += ["--rounds", "1", "--warmup", "1", "--batch-size", "2", "--skip-compiled"]
    else:
        report += ["--rounds", "10", "--only", REPORT_ONLY]
    stages["report_fp32"] = dict(argv=report + ["--json", str(out / "report_fp32.json")], limit_s=180,
                                 results=out / "report_fp32.json")
    for name, model, amp, mode in TRAIN_RUNS:
        argv = [python, "-m", "bench.bench_train", "--device", device, "--rounds", "1", "--amp", amp,
                "--out", str(out / f"{name}.json")]
        if tiny:
            argv += ["--model", "tiny", "--steps", "2", "--epochs", "2", "--batch-size", "8",
                     "--configs", "sam-functional-eager"]
        else:
            argv += ["--model", model, "--steps", "30", "--epochs", "2", "--configs", "sam-functional-compiled",
                     "--compile-mode", mode]
        stages[name] = dict(argv=argv, limit_s=120, results=out / f"{name}.json")
    if not tiny:
        stages["report_bf16"] = dict(argv=[python, "-m", "bench.report", "--device", device, "--amp", "bf16",
                                           "--rounds", "10", "--only", "^sam_step \\(compiled\\)|^torch\\.optim\\.SGD|"
                                           "compile\\(model\\) \\+ (torch\\.optim\\.SGD|SAM)",
                                           "--json", str(out / "report_bf16.json")],
                                     limit_s=200, results=out / "report_bf16.json")
    return stages


def warm_argv(out: Path, device: str, model: str, amp: str, mode: str) -> list[str]:
    """A one-step trainer run of a train_* stage's configuration: what it compiles, nothing timed. Its run
    folder (a WRN-28-10 checkpoint is 300 MB) goes under ``out``: a temporary folder, not the results'."""
    return [sys.executable, "-m", "train.cifar10", "--dataset", "synthetic", "--model", model, "--synthetic-size",
            "256", "--batch-size", "128", "--epochs", "1", "--warmup-epochs", "1", "--limit-steps", "1",
            "--device", device, "--optim", "sam", "--api", "functional", "--compile", "--amp", amp,
            "--compile-mode", mode, "--out", str(out / "warm" / f"{model}-{amp}-{mode}")]


def start_warming(out: Path, device: str, names: list[str]) -> list[tuple[str, subprocess.Popen]]:
    """Start the one-step runs of the train_* stages ``names``, all at once (compilation is CPU work)."""
    runs = []
    for name, model, amp, mode in TRAIN_RUNS:
        if name in names:
            log = open(out / f"warm_{name}.log", "w")
            argv = warm_argv(Path(tempfile.mkdtemp(prefix="gpu_check_warm_")), device, model, amp, mode)
            runs.append((name, subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=child_env())))
    return runs


def finish_warming(runs: list[tuple[str, subprocess.Popen]], limit_s: float, started: float) -> dict:
    """Wait for the warming runs (killing what is left at ``limit_s``); their exit codes and the wall time."""
    deadline, codes = time.monotonic() + limit_s, {}
    for name, process in runs:
        try:
            codes[name] = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            codes[name] = "killed at the limit"
    ok = all(code == 0 for code in codes.values())
    return dict(status="ok" if ok else "failed", returncode=codes, wall_s=round(time.monotonic() - started, 1),
                command="one-step runs of " + ", ".join(codes) + " (logs: warm_*.log)")


def child_env() -> dict:
    """The environment of every stage: this checkout first on PYTHONPATH."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def environment() -> dict:
    """The card, driver and memory (nvidia-smi), torch and its CUDA, the host and its load."""
    import torch

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               host=platform.node(), python=platform.python_version(), torch=torch.__version__,
               torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               cpu_count=os.cpu_count(), load_average=list(os.getloadavg()))
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
    else:
        env["nvidia_smi"] = "not found"
    return env


def run_stage(argv: list[str], limit_s: float, results: Path | None) -> dict:
    """One stage as a subprocess in the repository root, cut at ``limit_s`` seconds."""
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=limit_s, env=child_env())
        status, code, output = ("ok" if done.returncode == 0 else "failed"), done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status, code = "timed out", None
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                         for part in (expired.stdout, expired.stderr))
    record = dict(command=" ".join(argv), status=status, returncode=code, limit_s=round(limit_s),
                  wall_s=round(time.perf_counter() - started, 1), output_tail=output[-4000:])
    if results is not None and results.exists():
        record["results"] = json.loads(results.read_text())
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Stages: cuda_tests, report_fp32, " + ", ".join(n for n, *_ in TRAIN_RUNS)
                                + ", report_bf16")
    p.add_argument("out", type=Path, help="output folder; the results go to OUT/gpu_check.json")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny eager stages (no compile): checks the plumbing")
    p.add_argument("--budget-s", type=float, default=450, help="wall seconds for every stage together")
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages (the environment always)")
    p.add_argument("--dry-run", action="store_true", help="write the plan (each stage's command), run nothing")
    args = p.parse_args(argv)

    stages = plan(args.out, args.device, args.tiny)
    unknown = set(args.only or []) - set(stages)
    if unknown:
        p.error(f"unknown stage(s) {', '.join(sorted(unknown))}; the stages are: {', '.join(stages)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / RESULTS_NAME
    deadline = time.monotonic() + args.budget_s
    record = dict(argv=sys.argv[1:] if argv is None else argv, budget_s=args.budget_s, device=args.device,
                  tiny=args.tiny, environment=environment(), stages={})
    selected = [name for name in stages if not args.only or name in args.only]
    warming = [] if args.tiny or args.dry_run else start_warming(args.out, args.device, selected)
    warm_started = time.monotonic()
    for name in selected:
        stage = stages[name]
        if warming and name != "cuda_tests":  # nothing is timed while the caches fill
            limit = min(WARM_LIMIT_S, deadline - time.monotonic())
            record["stages"]["warm_caches"] = finish_warming(warming, limit, warm_started)
            warming = []
        left = deadline - time.monotonic()
        if args.dry_run or left < MIN_STAGE_S:
            result = dict(command=" ".join(stage["argv"]), status="dry run" if args.dry_run else "skipped",
                          reason=None if args.dry_run else f"{left:.0f} s of the budget left")
        else:
            print(f"[gpu_check] {name} (up to {min(stage['limit_s'], left):.0f} s)", flush=True)
            result = run_stage(stage["argv"], min(stage["limit_s"], left), stage["results"])
            print(f"[gpu_check] {name}: {result['status']} in {result['wall_s']} s", flush=True)
        record["stages"][name] = result
        results_file.write_text(json.dumps(record, indent=2) + "\n")  # after every stage: a cut call keeps it
    results_file.write_text(json.dumps(record, indent=2) + "\n")
    print(results_file)
    return 0 if all(s["status"] in ("ok", "dry run") for s in record["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
