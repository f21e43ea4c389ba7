"""Run slow work (network calls, file writing) off the GUI thread, cancellably.

The worker function gets a `JobContext` to report progress and check for cancellation. The
GUI never touches the thread: it polls `BackgroundJob.poll()` from a QTimer and gets back the
progress messages since the last poll and, once finished, the result or the error.
"""

import queue
import threading
import time


class Cancelled(Exception):
    """Raised inside a job when the user pressed Cancel."""


class JobContext:
    """Given to the worker: `progress(fraction, message)`, `cancelled`, `check()`."""

    def __init__(self, job):
        self._job = job

    @property
    def cancelled(self):
        return self._job._cancel.is_set()

    def check(self):
        if self.cancelled:
            raise Cancelled()

    def progress(self, fraction=None, message=""):
        self._job._updates.put((fraction, message))
        self.check()

    def wait(self, seconds):
        """Sleep up to `seconds`, waking at once on cancel (then raises Cancelled)."""
        if self._job._cancel.wait(seconds):
            raise Cancelled()


class BackgroundJob:
    """One piece of work on a daemon thread. States: pending, running, done, failed, cancelled."""

    def __init__(self, work, name="job"):
        self._work = work
        self.name = name
        self._cancel = threading.Event()
        self._updates = queue.Queue()
        self._thread = None
        self.state = "pending"
        self.result = None
        self.error = None
        self.started_at = None
        self.finished_at = None

    def start(self):
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        self.state = "running"
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"RadDiag-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        context = JobContext(self)
        try:
            result = self._work(context)
            if self._cancel.is_set():
                self.state = "cancelled"  # finished anyway: its result is dropped
            else:
                self.result = result
                self.state = "done"
        except Cancelled:
            self.state = "cancelled"
        except BaseException as e:  # reported to the GUI, never lost in a thread
            self.error = e
            self.state = "cancelled" if self._cancel.is_set() else "failed"
        finally:
            self.finished_at = time.monotonic()

    def cancel(self):
        """Ask the work to stop; it stops at its next check and its result is discarded."""
        self._cancel.set()

    @property
    def finished(self):
        return self.state in ("done", "failed", "cancelled") and not (self._thread and self._thread.is_alive())

    def poll(self):
        """[(fraction, message), ...] reported since the last poll (GUI thread, non-blocking)."""
        updates = []
        while True:
            try:
                updates.append(self._updates.get_nowait())
            except queue.Empty:
                return updates

    def wait(self, timeout=None):
        """Block until finished (tests and scripts; the GUI polls instead). Returns `finished`."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.finished

    @property
    def elapsed(self):
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.monotonic()) - self.started_at
