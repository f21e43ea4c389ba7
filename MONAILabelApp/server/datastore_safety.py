"""Crash-safe writes for MONAI Label's local (and DICOMweb cache) datastore.

MONAI Label copies labels and images straight onto their final name and rewrites
``datastore_v2.json`` in place, so a kill mid-write leaves a truncated label or an unreadable
index (and an overwritten label is lost). We keep its datastore classes and change, on the
class (so a datastore re-created by ``POST /reload`` has them too):

- copies and index writes are atomic (``raddiagseg.fileio.atomic_write``: a hidden temporary file in
  the same folder, fsync, ``os.replace``); each index write also refreshes ``datastore_v2.json.last-good``;
- an index that does not parse (torn by another writer, 0 bytes) is set aside as
  ``*.broken-<time>`` and replaced by the last-good copy, so the server starts and keeps every
  label's info; with no readable copy it starts from the files on disk and says so in the log;
- a label and its info are one change: before the label file is renamed, the new info (with the
  label's SHA-256) is journaled in ``.pending-label-*.json`` next to the index. On the next start
  a journal whose label file carries that digest is applied (the new pair), any other is dropped
  (the old pair), so a kill between the two renames never pairs a new label with old info.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil as _shutil
import time
import types
import uuid
from pathlib import Path

from raddiagseg.fileio import atomic_write

logger = logging.getLogger(__name__)
PARTIAL_PREFIX = ".partial-"
LAST_GOOD_SUFFIX = ".last-good"
JOURNAL_PREFIX = ".pending-label-"
_STOCK = {}  # MONAI Label's own methods, wrapped below


def atomic_copy(src, dst, *, follow_symlinks=True):
    """Like ``shutil.copy`` but readers see either the old file or the complete new one.

    It replaces ``shutil.copy`` inside MONAI Label's datastore, so it takes the same arguments; the source
    is always read through its links (``follow_symlinks`` is accepted, not used)."""
    dst = str(dst)
    if os.path.isdir(dst):
        dst = os.path.join(dst, os.path.basename(str(src)))
    with open(src, "rb") as inp:
        _write_atomic(dst, lambda out: _shutil.copyfileobj(inp, out, 1024 * 1024))
    return dst


def _write_atomic(dst: str, fill) -> None:
    """``fill(binary file)``, then the file replaces ``dst`` at once (``raddiagseg.fileio.atomic_write``)."""

    def write(tmp):
        with open(tmp, "wb") as out:
            fill(out)

    atomic_write(dst, write, prefix=PARTIAL_PREFIX)


def _write_text_atomic(dst: str, text: str) -> None:
    atomic_write(dst, text, prefix=PARTIAL_PREFIX)


class _AtomicShutil(types.ModuleType):
    """``shutil`` with ``copy`` made atomic; everything else is the real module."""

    def __init__(self):
        super().__init__("shutil")

    def __getattr__(self, name):
        return getattr(_shutil, name)

    copy = staticmethod(atomic_copy)


def _atomic_update_datastore_file(self, lock=True):
    """``LocalDatastore._update_datastore_file``: the index, then its last-good copy, each atomically."""
    from filelock import FileLock

    def write():
        self._ignore_event_config = True
        text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
        _write_text_atomic(self._datastore_config_path, text)
        self._config_ts = os.stat(self._datastore_config_path).st_mtime
        _write_text_atomic(self._datastore_config_path + LAST_GOOD_SUFFIX, text)

    if lock:
        with FileLock(self._lock_file):
            write()
    else:
        write()


def _parse_index(path: str):
    from monailabel.datastore.local import LocalDatastoreModel

    with open(path, encoding="utf-8") as f:
        return LocalDatastoreModel.model_validate_json(f.read())


def _recover_index(self, error: Exception):
    """The index did not parse: set it aside and put the last-good copy (or nothing) in its place."""
    path = self._datastore_config_path
    broken = f"{path}.broken-{time.strftime('%Y%m%d-%H%M%S')}"
    if os.path.exists(path):
        os.replace(path, broken)
    try:
        model = _parse_index(path + LAST_GOOD_SUFFIX)
    except (OSError, ValueError) as e:
        logger.error("datastore index %s is unreadable (%s; kept as %s) and so is its last-good copy (%s): "
                     "rebuilding it from the files on disk; label info not in the files is lost",
                     path, error, os.path.basename(broken), e)
        return None
    with open(path + LAST_GOOD_SUFFIX, "rb") as src:
        _write_atomic(path, lambda out: _shutil.copyfileobj(src, out))
    logger.error("datastore index %s was unreadable (%s; kept as %s): restored its last-good copy",
                 path, error, os.path.basename(broken))
    return model


def _load_datastore_file(self, throw_exception=False):
    """``LocalDatastore._init_from_datastore_file`` that never fails on a torn index (see ``_recover_index``)."""
    from filelock import FileLock

    path = self._datastore_config_path
    with FileLock(self._lock_file):
        exists = os.path.exists(path)
        if exists and os.stat(path).st_mtime == self._config_ts:
            return
        if not exists and not os.path.exists(path + LAST_GOOD_SUFFIX):
            return  # a new datastore: MONAI Label writes the first index after scanning the folder
        try:
            model = _parse_index(path)
        except (OSError, ValueError) as e:
            model = _recover_index(self, e)
        if model is not None:
            model.base_path = self._datastore_path
            self._datastore = model
        if os.path.exists(path):
            self._config_ts = os.stat(path).st_mtime


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _journaled_save_label(self, image_id, label_filename, label_tag, label_info):
    """``LocalDatastore.save_label`` with the new info journaled before the label is renamed."""
    info = dict(label_info or {})
    info["sha256"] = _sha256(label_filename)
    _, ext = self._to_id(os.path.basename(label_filename))
    entry = {"image": image_id, "tag": label_tag, "ext": ext, "info": info, "ts": int(time.time())}
    journal = os.path.join(self._datastore_path, f"{JOURNAL_PREFIX}{uuid.uuid4().hex}.json")
    _write_text_atomic(journal, json.dumps(entry, default=str))
    label_id = _STOCK["save_label"](self, image_id, label_filename, label_tag, info)
    os.unlink(journal)
    return label_id


def replay_label_journal(datastore) -> int:
    """Finish the label saves a kill interrupted: apply each journaled info whose label file is the
    journaled one, drop the others; returns how many were applied."""
    from monailabel.datastore.local import DataModel

    applied = 0
    journals = sorted(Path(datastore._datastore_path).glob(JOURNAL_PREFIX + "*.json"), key=lambda p: p.stat().st_mtime)
    for journal in journals:
        try:
            entry = json.loads(journal.read_text())
            image_id, tag, ext, info = entry["image"], entry["tag"], entry["ext"], entry["info"]
        except (OSError, ValueError, KeyError, TypeError):
            entry = None
        obj = datastore._datastore.objects.get(image_id) if entry else None
        label_file = os.path.join(datastore._datastore.label_path(tag), image_id + ext) if obj else ""
        if obj and os.path.isfile(label_file) and _sha256(label_file) == info.get("sha256"):
            info = {**info, "ts": entry["ts"], "name": image_id + ext}
            obj.labels[tag] = DataModel(info=info, ext=ext)
            applied += 1
            logger.warning("label %s/%s: its save was interrupted after the label was written; applied its info",
                           tag, image_id)
        else:
            logger.warning("%s: an interrupted label save that never replaced the label; dropped", journal.name)
        journal.unlink()
    if applied:
        datastore._update_datastore_file()
    return applied


def _init_and_replay(self, *args, **kwargs):
    _STOCK["__init__"](self, *args, **kwargs)
    replay_label_journal(self)


def install_atomic_writes(datastore=None) -> bool:
    """Make every LocalDatastore's copies, index writes and label saves crash-safe (once, on the
    class, before the app creates its datastore); False if ``datastore`` is not file-based."""
    from monailabel.datastore import local

    cls = local.LocalDatastore
    if not _STOCK:
        _STOCK.update(__init__=cls.__init__, save_label=cls.save_label)
        local.shutil = _AtomicShutil()
        cls.__init__ = _init_and_replay
        cls.save_label = _journaled_save_label
        cls._update_datastore_file = _atomic_update_datastore_file
        cls._init_from_datastore_file = _load_datastore_file
    return isinstance(datastore, cls)


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
