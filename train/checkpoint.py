"""Checkpoints that survive a kill at any instant, and refuse to be mixed up; the run folder's lock.

A checkpoint is one ``torch.save``d dict (``save`` below: the arguments, epoch, step, metrics so far,
RNG states, and the stepper's ``params``, ``buffers`` and ``optimizer``) written atomically: to a temporary file in the same folder, flushed and fsynced, then renamed over
the old one, so a reader sees either the previous complete checkpoint or the new complete one,
never a torn file. Loading uses ``weights_only=True``: a checkpoint is data, never code, and a
checkpoint is refused (``CheckpointError``, the file left untouched) before anything is restored
when it is unreadable, lacks a part, belongs to another configuration or number of processes, or
holds tensors that do not fit the model (the steppers check their optimizer state).

One trainer at a time per run folder: ``RunLock`` holds an exclusive ``fcntl.flock`` on ``.lock``
in it (with the holder's pid and host), released by the kernel when the process dies, so a lock
left by a killed trainer never blocks its resumption.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Any, Iterable

import torch

from train.folders import make_folders, remove_empty_folders

FORMAT = "funcsam.train.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".lock"
# What every checkpoint holds, and the type of each part.
PARTS = dict(args=dict, epoch=int, step=int, history=list, params=dict, buffers=dict, optimizer=dict, rng=dict)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


class RunFolderError(Exception):
    """The run folder cannot be used (not writable, full, in use by another trainer)."""


@contextlib.contextmanager
def writing(path: Path):
    """Turn an OSError while writing ``path`` into a RunFolderError that says what to do."""
    try:
        yield
    except OSError as err:
        advice = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
                  errno.EROFS: "choose a writable --out", errno.EACCES: "choose a writable --out"}
        raise RunFolderError(
            f"cannot write {path}: {err.strerror or err}; {advice.get(err.errno, 'check --out')} "
            "(a checkpoint already there was kept; rerun with --resume to continue from it)"
        ) from None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


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
            f"{path} is corrupt or not a checkpoint ({type(err).__name__}: {first_line(err)}). " + advice
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a funcsam.train checkpoint (format {FORMAT!r}). " + advice)
    missing = [key for key, kind in PARTS.items() if not isinstance(payload.get(key), kind)]
    if missing:
        raise CheckpointError(f"{path} is incomplete: it lacks (or has damaged) {', '.join(missing)}. " + advice)
    return payload


def save(path: Path, args: dict, epoch: int, step: int, history: list[dict], stepper) -> None:
    """Everything a resumed run needs to continue bit-for-bit (the stepper gives its own part)."""
    with writing(path):
        save_atomically(dict(args=args, epoch=epoch, step=step, history=history, **stepper.state_dict(),
                             rng=rng_states()), path)


def check_resumable(saved: dict, args: dict, run_defining: Iterable[str], defaults: dict, path: Path) -> None:
    """Refuse a checkpoint of another number of processes or another configuration; ``defaults``
    stand in for arguments that did not exist yet when it was written."""
    saved_args = {**defaults, **saved["args"]}
    if saved_args["world_size"] != args["world_size"]:  # not a flag: say how to match it
        raise CheckpointError(
            f"{path} belongs to a run on {saved_args['world_size']} process(es), this one has "
            f"{args['world_size']}: the shards, and so the trajectory, would differ. Resume it with "
            f"`torchrun --nproc_per_node {saved_args['world_size']}` (1: plain python), or use another --out. "
            "The checkpoint was left untouched."
        )
    check_same_run(saved_args, args, run_defining, path)


def check_tensors(saved: dict, expected: dict, what: str, path: Path) -> None:
    """Refuse saved tensors whose names or shapes differ from the model's."""
    if set(saved) != set(expected) or any(
            not isinstance(saved[k], torch.Tensor) or saved[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(
            f"{path}: its {what} do not fit this model (names or shapes differ). "
            "It was left untouched; use another --out to start over."
        )


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


class RunLock:
    """An exclusive lock on a run folder, held until ``release`` (or the process's death).

    ``acquire`` creates the folder (and its missing parents) if needed; those it created and that
    are left empty are removed again on release, so a run refused before writing anything leaves
    nothing behind."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.created: list[Path] = []
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        with writing(self.path):
            self.created = make_folders(self.folder)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise RunFolderError(
                        f"{self.folder} is in use by another trainer ({holder}, lock {self.path}): wait for it "
                        "to finish or stop it, or choose another --out"
                    ) from None
                if not self._still_linked(fd):  # its holder removed it on release: lock the new one
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
                self.fd = fd
        return self

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still held: a waiting trainer then sees a fresh file
        os.close(self.fd)
        self.fd = None
        remove_empty_folders(self.created)  # only those the run wrote nothing into
