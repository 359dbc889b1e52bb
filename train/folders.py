"""The folders a run creates, and taking them away again when the run put nothing in them.

A run that fails before it writes anything (a download that failed, a run folder refused) leaves
the file system as it found it: ``make_folders`` returns the folders it had to create, outermost
first, and ``remove_empty_folders`` removes those that are still empty, innermost first. A folder
that existed before, or one that holds anything, is never removed.
"""

from __future__ import annotations

from pathlib import Path


def make_folders(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the folders that did not exist before, outermost first."""
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    missing.reverse()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        remove_empty_folders(missing)  # the parents made before the one that failed
        raise
    return missing


def remove_empty_folders(created: list[Path]) -> None:
    """Remove the folders of ``created`` (outermost first, as ``make_folders`` returns them) that are
    empty, innermost first; one that is not empty (or cannot be removed) keeps its parents too."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return
