"""One rank of the trainer's --fsdp runs in test_train_fsdp.py (started by the test, not by pytest).

    python train_fsdp_worker.py ROOT TRAINER_ARGS...

Three runs of ``train.cifar10`` in one process group (so the ranks start once): ROOT/straight
uninterrupted; ROOT/resumed crashed when epoch 2 starts (after epoch 1's checkpoint), then resumed
with --resume. Rank and world come from the environment, as torchrun sets them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

import train.cifar10 as cifar10  # noqa: E402
from train.config import check_beyond_one_batch, parse_args, requested_world_size  # noqa: E402


def run(argv: list[str]) -> None:
    args = parse_args(argv)
    check_beyond_one_batch(args, requested_world_size())
    cifar10.train(args)


def crashing_at_epoch_2(num_samples, seed, epoch, device, *args, **kwargs):
    if epoch + 1 == 2:
        raise RuntimeError("simulated crash at the start of epoch 2")
    return make_epoch_plan(num_samples, seed, epoch, device, *args, **kwargs)


if __name__ == "__main__":
    root, trainer_args = sys.argv[1], sys.argv[2:]
    run([*trainer_args, "--out", os.path.join(root, "straight")])
    make_epoch_plan = cifar10.make_epoch_plan
    cifar10.make_epoch_plan = crashing_at_epoch_2
    try:
        run([*trainer_args, "--out", os.path.join(root, "resumed")])
    except RuntimeError as error:
        assert "simulated crash" in str(error), error
    cifar10.make_epoch_plan = make_epoch_plan
    run([*trainer_args, "--out", os.path.join(root, "resumed"), "--resume"])
    dist.destroy_process_group()
