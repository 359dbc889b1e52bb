"""One rank of the trainer in test_train_distributed.py (started by the test, not by pytest).

    python train_dp_worker.py TRAINER_ARGS...     exactly ``python -m train.cifar10 TRAINER_ARGS...``
    python train_dp_worker.py ARGS_1... --then ARGS_2... [--then ...]
                                                  the runs one after the other in this process (each
                                                  joins and leaves its own process group; the ports of
                                                  the runs after the first in THEN_PORTS, comma-separated)

With CRASH_AT_EPOCH=E in the environment, or ``--simulate-crash-at-epoch E`` among a run's
arguments, every rank raises when it starts (1-based) epoch E, after epoch E-1's checkpoint was
written: the state a restart finds after a crash of the whole job. Rank and world come from the
environment, as torchrun sets them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train.cifar10 as cifar10  # noqa: E402

MAKE_EPOCH_PLAN = cifar10.make_epoch_plan
CRASH_FLAG = "--simulate-crash-at-epoch"


def crash_when_epoch_starts(epoch_number: int | None) -> None:
    """Make the trainer raise when it starts ``epoch_number`` (None: never)."""
    def plan_or_crash(num_samples, seed, epoch, device, *args, **kwargs):
        if epoch + 1 == epoch_number:
            raise RuntimeError(f"simulated crash at the start of epoch {epoch_number}")
        return MAKE_EPOCH_PLAN(num_samples, seed, epoch, device, *args, **kwargs)

    cifar10.make_epoch_plan = plan_or_crash


def split_runs(argv: list[str]) -> list[list[str]]:
    runs = [[]]
    for arg in argv:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


def run(argv: list[str]) -> int:
    """``cifar10.main(argv)``, crashing where ``--simulate-crash-at-epoch`` says (the crash propagates)."""
    crash_at = os.environ.get("CRASH_AT_EPOCH")
    if CRASH_FLAG in argv:
        at = argv.index(CRASH_FLAG)
        crash_at, argv = argv[at + 1], argv[:at] + argv[at + 2:]
    crash_when_epoch_starts(int(crash_at) if crash_at else None)
    return cifar10.main(argv)


def main() -> int:
    runs = split_runs(sys.argv[1:])
    ports = [p for p in os.environ.get("THEN_PORTS", "").split(",") if p]
    if len(runs) == 1:
        return run(runs[0])
    if len(ports) != len(runs) - 1:
        raise SystemExit(f"{len(runs)} runs need {len(runs) - 1} ports in THEN_PORTS, got {ports}")
    codes = []
    for index, argv in enumerate(runs):
        if index:
            os.environ["MASTER_PORT"] = ports[index - 1]
        try:
            codes.append(run(argv))
        except RuntimeError as err:  # a simulated crash: the next run resumes from its checkpoint
            if "simulated crash" not in str(err):
                raise
            print(f"run {index + 1}: {err}", file=sys.stderr, flush=True)
            codes.append(0)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
