"""Crash-safe writes for MONAI Label's local (and DICOMweb cache) datastore.

MONAI Label copies labels and images straight onto their final name and rewrites
``datastore_v2.json`` in place, so a kill mid-write leaves a truncated label or an unreadable
index (and an overwritten label is lost). We keep its datastore classes and make those two
writes atomic with ``raddiagseg.fileio.atomic_write`` (hidden temporary file, fsync, ``os.replace``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil as _shutil
import types
from pathlib import Path

from raddiagseg.fileio import atomic_write

logger = logging.getLogger(__name__)
PARTIAL_PREFIX = ".partial-"


def atomic_copy(src, dst, *, follow_symlinks=True):
    """Like ``shutil.copy`` but readers see either the old file or the complete new one.

    It replaces ``shutil.copy`` inside MONAI Label's datastore, so it takes the same arguments; the source
    is always read through its links (``follow_symlinks`` is accepted, not used)."""
    dst = str(dst)
    if os.path.isdir(dst):
        dst = os.path.join(dst, os.path.basename(str(src)))

    def copy(tmp):
        with open(tmp, "wb") as out, open(src, "rb") as inp:  # a stream copy: `src` may be a pipe
            _shutil.copyfileobj(inp, out, 1024 * 1024)

    atomic_write(dst, copy, prefix=PARTIAL_PREFIX)
    return dst


class _AtomicShutil(types.ModuleType):
    """``shutil`` with ``copy`` made atomic; everything else is the real module."""

    def __init__(self):
        super().__init__("shutil")

    def __getattr__(self, name):
        return getattr(_shutil, name)

    copy = staticmethod(atomic_copy)


def _atomic_update_datastore_file(self, lock=True):
    """Replacement for ``LocalDatastore._update_datastore_file`` writing the index atomically."""
    from filelock import FileLock

    def write():
        self._ignore_event_config = True
        text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
        atomic_write(self._datastore_config_path, text, prefix=PARTIAL_PREFIX)
        self._config_ts = os.stat(self._datastore_config_path).st_mtime

    if lock:
        with FileLock(self._lock_file):
            write()
    else:
        write()


def install_atomic_writes(datastore) -> bool:
    """Make ``datastore``'s label/image copies and index writes atomic; False if it is not file-based."""
    from monailabel.datastore import local

    if not isinstance(datastore, local.LocalDatastore):
        return False
    if not isinstance(local.shutil, _AtomicShutil):
        local.shutil = _AtomicShutil()
    datastore._update_datastore_file = types.MethodType(_atomic_update_datastore_file, datastore)
    return True


def remove_partial_files(root: str | os.PathLike) -> list[str]:
    """Delete temporaries left by a killed write (they never replaced a real file)."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for path in root.rglob(PARTIAL_PREFIX + "*"):
        if path.is_file():
            path.unlink()
            removed.append(str(path))
    if removed:
        logger.warning("removed %d partial file(s) left by an interrupted write", len(removed))
    return removed
