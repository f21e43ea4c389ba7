"""One training run at a time per work dir, and none outliving the server that started it.

MONAI Label runs training in a subprocess of the server. A server killed with -9 cannot stop it:
the orphan kept training (and could publish), a restarted server started a second run beside it,
and ``train_stats.json`` said RUNNING for ever. Here:

- ``single_run(work_dir)`` holds an exclusive ``flock`` on ``work_dir/train.lock`` for the run. The
  kernel releases it when the process ends, however it ends, so it is never stale; a second run
  while one holds it is refused (``TrainingBusy``) before it touches anything;
- ``exit_with_parent(on_exit)`` ends a training subprocess when the server that started it is
  gone (the process was re-parented, so ``os.getppid()`` changed). The server is the pid in
  ``RADDIAG_SERVER_PID`` (``serve.py`` sets it), else the parent of MONAI Label's task runner;
  training run inside the server process itself is never watched;
- ``is_running(work_dir)`` tells whether a run holds the lock, so a RUNNING status left by a run
  that died is reported as INTERRUPTED.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)
LOCK_NAME = "train.lock"
PARENT_POLL_S = 1.0
SERVER_PID_ENV = "RADDIAG_SERVER_PID"
TASK_RUNNER = "monailabel.interfaces.utils.app"  # the module MONAI Label runs training subprocesses with


class TrainingBusy(RuntimeError):
    """Another training run holds the work dir."""


@contextlib.contextmanager
def single_run(work_dir):
    path = Path(work_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise TrainingBusy(f"another training run (pid {holder}) is still running on {path.parent.name}; "
                               "stop it (DELETE /train/) or wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_running(work_dir) -> bool:
    path = Path(work_dir) / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock taken just to look
    return False


def server_pid() -> int | None:
    """The server this process trains for, when it is a subprocess of one."""
    named = os.environ.get(SERVER_PID_ENV, "")
    if named.isdigit():
        return int(named)
    main = sys.modules.get("__main__")
    return os.getppid() if getattr(getattr(main, "__spec__", None), "name", None) == TASK_RUNNER else None


def exit_with_parent(on_exit, poll_s: float = PARENT_POLL_S) -> threading.Thread | None:
    """Once the server this subprocess trains for is gone, call ``on_exit()`` and end the process.
    Returns the watcher thread, or None when there is no such server (training inside the server)."""
    parent = server_pid()
    if parent is None or parent == os.getpid() or parent != os.getppid():
        return None

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        logger.error("the server that started this training run (pid %d) is gone: stopping", parent)
        try:
            on_exit()
        finally:
            os._exit(3)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread
