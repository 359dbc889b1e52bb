"""Checkpoints that survive a kill at any instant, and refuse to be mixed up.

A checkpoint is one ``torch.save``d dict (see ``make_checkpoint`` in ``train.cifar10`` for its keys)
written atomically: to a temporary file in the same folder, flushed and fsynced, then renamed over
the old one, so a reader sees either the previous complete checkpoint or the new complete one,
never a torn file. Loading uses ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch

FORMAT = "funcsam.train.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


def save_atomically(payload: dict, path: Path) -> None:
    """Write ``payload`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    # The rename itself lives in the directory: sync it so it survives a power cut too.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The payload saved at ``path``; CheckpointError if it is not a readable checkpoint of ours."""
    advice = (
        "It was left untouched. Move or delete it to start over, or point --out at another folder."
    )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, foreign pickle: all mean unusable
        raise CheckpointError(
            f"{path} is corrupt or not a checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            + advice
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a funcsam.train checkpoint (format {FORMAT!r}). " + advice)
    return payload


def check_same_run(saved_args: dict, args: dict, keys: Iterable[str], path: Path) -> None:
    """Refuse to resume when an argument that shapes the training trajectory differs."""
    differences = [
        f"--{key.replace('_', '-')}: checkpoint {saved_args.get(key)!r}, now {args.get(key)!r}"
        for key in keys
        if saved_args.get(key) != args.get(key)
    ]
    if differences:
        raise CheckpointError(
            f"{path} belongs to a different run; resuming would mix two configurations:\n  "
            + "\n  ".join(differences)
            + "\nRerun with the checkpoint's arguments (see args.json beside it), or use another --out. "
            "The checkpoint was left untouched."
        )


def rng_states() -> dict[str, Any]:
    """The global RNG states (CPU and every CUDA device). Training draws its randomness from
    per-epoch generators, so these only matter to code outside the trainer's control."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
