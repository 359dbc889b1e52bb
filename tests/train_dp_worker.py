"""One rank of the trainer in test_train_distributed.py (started by the test, not by pytest).

    python train_dp_worker.py TRAINER_ARGS...     exactly ``python -m train.cifar10 TRAINER_ARGS...``

With CRASH_AT_EPOCH=E in the environment, every rank raises when it starts (1-based) epoch E, after
epoch E-1's checkpoint was written: the state a restart finds after a crash of the whole job.
Rank and world come from the environment, as torchrun sets them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train.cifar10 as cifar10  # noqa: E402


def crash_when_epoch_starts(epoch_number: int) -> None:
    make_epoch_plan = cifar10.make_epoch_plan

    def plan_or_crash(num_samples, seed, epoch, device, *args, **kwargs):
        if epoch + 1 == epoch_number:
            raise RuntimeError(f"simulated crash at the start of epoch {epoch_number}")
        return make_epoch_plan(num_samples, seed, epoch, device, *args, **kwargs)

    cifar10.make_epoch_plan = plan_or_crash


if __name__ == "__main__":
    if os.environ.get("CRASH_AT_EPOCH"):
        crash_when_epoch_starts(int(os.environ["CRASH_AT_EPOCH"]))
    sys.exit(cifar10.main(sys.argv[1:]))
