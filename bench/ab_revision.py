"""A/B step times of this checkout's funcsam against another git revision's, interleaved in one process.

    python -m bench.ab_revision --rev 8b73ae3 [--rounds 11] [--batch-size 128] [--model resnet20]
                                [--threads N] [--only REGEX]

The other revision's ``funcsam/`` is read with ``git show`` into a temporary folder as the package
``funcsam_at_<rev>`` (its imports are relative, so both load side by side). Every variant calls the
public names both revisions have (``sam_step`` with its keywords, the named mode steps, ``SAMSGD``
and ``SAM`` with ``mode=``), on the same model, batch and starting point. Each round runs every
variant of both revisions once, so drift hits all alike; the table gives medians and new / old.
"""

from __future__ import annotations

import argparse
from copy import deepcopy
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import funcsam
from bench.report import time_interleaved
from train.models import build_model


def load_revision(rev: str, root: Path) -> object:
    """funcsam as it was at ``rev``, imported as ``funcsam_at_<rev>``."""
    name = "funcsam_at_" + re.sub(r"\W", "_", rev)
    files = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "funcsam/"], check=True,
                           capture_output=True, text=True).stdout.split()
    for path in files:
        target = root / name / Path(path).relative_to("funcsam")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True).stdout)
    sys.path.insert(0, str(root))
    return importlib.import_module(name)


def variants(pkg, model, batch) -> dict[str, Callable[[], None]]:
    """Step closures over one package: each carries its own params and state from step to step."""
    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers0 = {k: v.detach().clone() for k, v in model.named_buffers()}
    loss_fn = pkg.make_loss_fn(model, F.cross_entropy)
    sgd, adamw = pkg.sgd(momentum=0.9, weight_decay=5e-4), pkg.adamw(weight_decay=0.05)

    def functional(step_fn, init, **kwargs):
        carry = dict(params=params0, buffers=buffers0, state=init(params0), t=0)

        def step():
            extra = {key: value(carry) if callable(value) else value for key, value in kwargs.items()}
            out = step_fn(carry["params"], carry["buffers"], batch, loss_fn, 0.05, 0.1, carry["state"], **extra)
            carry.update(params=out.params, buffers=out.buffers, state=out.momentum_state, t=carry["t"] + 1)

        return step

    def optimizer(make):
        copy = deepcopy(model)
        opt = make(copy)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(copy(batch[0]), batch[1])
            loss.backward()
            return loss

        return lambda: opt.step(closure)

    micro = pkg.split_batch(batch, 2)
    return {
        "sam_step sgd": functional(pkg.sam_step, sgd.init, base=sgd),
        "sam_step adamw": functional(pkg.sam_step, adamw.init, base=adamw),
        "sam_step sgd, max_grad_norm, ASAM": functional(pkg.sam_step, sgd.init, base=sgd, max_grad_norm=1.0,
                                                        adaptive=True),
        "base step (rho 0)": functional(lambda *a, **k: pkg.sam_step(*a[:4], 0, *a[5:], **k), sgd.init, base=sgd),
        "looksam, SAM step": functional(pkg.looksam_step, lambda p: pkg.init_looksam(sgd, p), base=sgd, take_sam=True),
        "looksam, cheap step": functional(pkg.looksam_step, lambda p: pkg.init_looksam(sgd, p), base=sgd,
                                          take_sam=False),
        "gsam": functional(pkg.gsam_step, sgd.init, base=sgd, alpha=0.2),
        "msam": functional(pkg.msam_step, sgd.init, base=sgd),
        "AE-SAM": functional(pkg.adaptive_sam_step, lambda p: pkg.init_adaptive(sgd, p), base=sgd,
                             take_sam=lambda c: bool(c["state"].take_next), threshold=0.0),
        "m-sharpness 2": functional(pkg.m_sharpness_sam_step, sgd.init, base=sgd, m=2),
        "accumulated 2": functional(lambda p, b, _, *a, **k: pkg.accumulated_sam_step(p, b, micro, *a, **k),
                                    sgd.init, base=sgd),
        "SAMSGD": optimizer(lambda m: pkg.SAMSGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, model=m)),
        "SAMSGD LookSAM": optimizer(lambda m: pkg.SAMSGD(m.parameters(), lr=0.1, momentum=0.9, model=m,
                                                         mode=pkg.LookSAM(k=2))),
        "SAM(AdamW) GSAM": optimizer(lambda m: pkg.SAM(m.parameters(), torch.optim.AdamW, lr=1e-3, model=m,
                                                       mode=pkg.GSAM(0.2))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", default=None, help="a regular expression over the variant names")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, 10).to(memory_format=torch.channels_last)
    batch = (torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (args.batch_size,)))
    with tempfile.TemporaryDirectory() as folder:
        old = load_revision(args.rev, Path(folder))
        steps = {}
        for label, pkg in (("new", funcsam), ("old", old)):
            for name, step in variants(pkg, model, batch).items():
                if args.only is None or re.search(args.only, name):
                    steps[(name, label)] = step
        times = time_interleaved(steps, args.rounds, warmup=1, device="cpu")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n{args.model}, batch {args.batch_size}, channels_last, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; median of {args.rounds} interleaved rounds (ms/step); new = this checkout "
          f"({head} + working tree), old = {args.rev}\n")
    print("| step | new | old | new / old |")
    print("| --- | ---: | ---: | ---: |")
    for name in dict.fromkeys(name for name, _ in steps):
        new, old_ = (statistics.median(times[(name, label)]) * 1e3 for label in ("new", "old"))
        print(f"| {name} | {new:.1f} | {old_:.1f} | {new / old_:.3f} |")


if __name__ == "__main__":
    main()
