"""Crash-safe file writes: readers see the old file or the complete new one, never half of it.

One recipe for every hand-written atomic write in trainer/ and MONAILabelApp/: write a hidden temporary
file in the target's folder (same filesystem, so the rename is atomic), flush and fsync it, set its mode,
then `os.replace` it onto the target; on any error the temporary file is removed and the target is
untouched. Whole folders (checkpoints, the demo model, published models, reference sets) are staged next to
their target and renamed: a rename onto a new name is atomic as it is, replacing an existing folder takes the
two-step swap of `replace_folder` (a crash between its renames leaves the previous folder at `previous_folder`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

Content = Union[str, bytes, Callable[[Path], object]]


def atomic_write(path: str | os.PathLike, content: Content, *, mode: int | None = 0o644, prefix: str | None = None,
                 encoding: str = "utf-8") -> Path:
    """Write `content` to `path` atomically and return the path.

    `content`: text (written with `encoding`, newlines as given), bytes, or a callable that writes the
    temporary file whose path it gets (e.g. `lambda tmp: save_file(state, str(tmp))`). `mode`: the file's
    permissions (0o600 for secrets; None keeps mkstemp's 0o600). `prefix`: the temporary file's name prefix
    (default ".<name>."), for folders whose readers skip such files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.")
    tmp = Path(tmp_name)
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        else:
            data = content.encode(encoding) if isinstance(content, str) else content
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power cut
    return path


def previous_folder(target: str | os.PathLike) -> Path:
    """Where `replace_folder` keeps the folder it replaces until the new one is in place."""
    target = Path(target)
    return target.with_name(f".{target.name}.old")


def replace_folder(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make the complete folder `new` be `target`: target -> `previous_folder(target)`, new -> target, drop the old one.

    Readers see the old folder or the new one at `target`, except between the two renames, when only
    `previous_folder(target)` exists (`training.checkpoints.resolve_checkpoint` looks there)."""
    new, target = Path(new), Path(target)
    old = previous_folder(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)
    return target


def _fsync_dir(folder):
    """fsync a folder so that renames in it survive a power cut (skipped where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
