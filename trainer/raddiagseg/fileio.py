"""Crash-safe file writes: readers see the old file or the complete new one, never half of it.

One recipe for every hand-written atomic write in trainer/ and MONAILabelApp/: write a hidden temporary
file in the target's folder (same filesystem, so the rename is atomic), flush and fsync it, set its mode,
then `os.replace` it onto the target; on any error the temporary file is removed and the target is
untouched. Whole folders (checkpoints, published models, reference sets) are staged and renamed by their
own code: a folder rename is atomic too, but replacing an existing folder needs the two-step swap of
`training.checkpoints.replace_folder`.
"""

from __future__ import annotations

import os
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
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)
    return path
