"""A bounded, fair queue of model jobs in front of one model worker thread.

MONAI Label runs inference synchronously inside an async handler, which freezes the event loop
(and so ``/info/`` and the datastore) for the whole run. Here the model runs in a dedicated
thread and every request is a :class:`Job` with an id, a place in the queue and an ETA:

- capacity: requests beyond ``capacity`` (running + waiting) are refused at once (503);
- share: one user holds at most ``per_user`` of those slots (429), so others still get in;
- estimates: the mean of the measured run times of recent jobs of the same kind (not the first, which
  loads the model, once there are others), times the jobs
  ahead, over the workers; a running job counts what is left of it (the mean less its time so far, or
  its own per-slice ETA when that is longer). ``Retry-After`` on a refusal is the ETA the request
  would have had;
- cancellation: a job whose client hung up is dropped before it runs, or, while it runs, stopped at
  its next progress report (``Job.report`` raises :class:`Cancelled`), so it frees its slot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
PROGRESS_KEYS = ("stage", "slices_done", "slices_planned", "n_slices")  # what a job shows of a model's report


class Cancelled(Exception):
    """The job's client hung up; raised in the model thread at the next cancellation point."""


class QueueFull(Exception):
    """Refused at admission: ``status`` 503 (the queue is full) or 429 (the user's share is used)."""

    def __init__(self, message: str, retry_after: int, job: "Job", status: int = 503):
        super().__init__(message)
        self.retry_after, self.job, self.status = retry_after, job, status


@dataclass
class Job:
    """One model request; the fields a client sees come from :meth:`ModelQueue.describe`."""

    id: str
    user: str
    kind: str  # e.g. "infer", "activelearning"
    target: str  # the model or strategy
    key: str  # jobs with the same key take comparable time (e.g. "infer/raddiagseg/volume")
    image: str | None = None  # a datastore id, never a server path
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    state: str = "queued"  # queued, running, done, failed, cancelled, refused
    detail: str | None = None
    progress: dict = field(default_factory=dict)
    model_eta_s: float | None = None  # the model's own estimate of what is left while running
    cancel: threading.Event = field(default_factory=threading.Event)

    def report(self, state: dict) -> None:
        """Progress callback for the model (``request["on_progress"]``); the cancellation point."""
        self.progress = {k: state[k] for k in PROGRESS_KEYS if k in state}
        self.model_eta_s = state.get("eta_s")
        if self.cancel.is_set():
            raise Cancelled(f"job {self.id} cancelled: the client disconnected")


class ModelQueue:
    def __init__(self, capacity: int = 16, workers: int = 1, per_user: int | None = None, history: int = 100):
        if capacity < 1:
            raise ValueError("queue capacity must be >= 1")
        self.capacity = capacity
        self.history = history
        self.workers = workers
        self.per_user = min(capacity, per_user if per_user is not None else max(1, math.ceil(capacity / 2)))
        if self.per_user < 1:
            raise ValueError("per-user share must be >= 1")
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="model")
        self._lock = threading.Lock()  # job state changes between the event loop and the model thread
        self._active: dict[str, Job] = {}  # in submission order, which is the order the worker takes them
        self._finished: deque[Job] = deque(maxlen=history)
        self._first: dict[str, float] = {}  # key -> run time (s) of its first job, which loads the model
        self._durations: dict[str, deque] = {}  # key -> run times (s) of its last completed jobs after the first
        self.counts = {"done": 0, "failed": 0, "cancelled_queued": 0, "cancelled_running": 0, "refused": 0}

    @property
    def depth(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------------ estimates
    def _runs(self, key: str) -> list[float]:
        """Measured run times that stand for ``key``: its recent ones after the first (which pays one-off
        costs: the model load, 3x a later run on CPU), else its first, else any kind's."""
        with self._lock:
            if self._durations.get(key):
                return list(self._durations[key])
            if key in self._first:
                return [self._first[key]]
            return list(itertools.chain(*self._durations.values())) or list(self._first.values())

    def typical_s(self, key: str) -> float:
        """Mean measured run time of recent ``key`` jobs (see ``_runs``); else the longest-running job so
        far (it takes at least that long); else 1 s."""
        runs = self._runs(key)
        if runs:
            return sum(runs) / len(runs)
        elapsed = [time.time() - j.started for j in list(self._active.values()) if j.started]
        return max([1.0, *elapsed])

    def _remaining_s(self, job: Job, now: float) -> float:
        """A running job: the longer of the mean less its time so far and the model's own estimate (which
        counts only the slices planned so far; a volume plans more as it goes)."""
        if job.state == "running":
            left = max(0.0, self.typical_s(job.key) - (now - job.started))
            return max(left, float(job.model_eta_s or 0.0))
        return self.typical_s(job.key)

    def estimates(self) -> dict[str, tuple[int, float]]:
        """{job id: (position, eta_s)} of the active jobs: position 0 while running, 1.. while waiting;
        eta_s until the job finishes (the work ahead of it spread over the workers, plus its own)."""
        now, ahead, waiting, out = time.time(), 0.0, 0, {}
        for job in list(self._active.values()):
            own = self._remaining_s(job, now)
            if job.state == "running":
                out[job.id] = (0, own)
            else:
                waiting += 1
                out[job.id] = (waiting, ahead / self.workers + own)
            ahead += own
        return out

    def _eta_new(self, key: str) -> float:
        now = time.time()
        ahead = sum(self._remaining_s(j, now) for j in list(self._active.values()))
        return ahead / self.workers + self.typical_s(key)

    # ------------------------------------------------------------------ admission and running
    def admit(self, user: str, kind: str, target: str, key: str | None = None, image: str | None = None) -> Job:
        """A new queued job, or :class:`QueueFull` (the refused job is kept, so its id can be looked up)."""
        job = Job(id=uuid.uuid4().hex, user=user, kind=kind, target=target, key=key or f"{kind}/{target}", image=image)
        if len(self._active) >= self.capacity:
            raise self._refuse(job, 503, f"the server is busy: {self.capacity} requests are already running or "
                                         f"waiting", self._eta_new(job.key))
        mine = [j for j in self._active.values() if j.user == user]
        if len(mine) >= self.per_user:
            estimates = self.estimates()
            wait = min(estimates[j.id][1] for j in mine)
            raise self._refuse(job, 429, f"user {user!r} already has {len(mine)} requests running or waiting, the "
                                         f"most one user may hold (of {self.capacity}); retry when one has finished",
                               wait)
        self._active[job.id] = job
        return job

    def _refuse(self, job: Job, status: int, message: str, wait_s: float) -> QueueFull:
        retry_after = max(1, math.ceil(wait_s))
        job.state, job.finished, job.detail = "refused", time.time(), f"{message}; retry in {retry_after} s"
        self._finished.append(job)
        self.counts["refused"] += 1
        return QueueFull(job.detail, retry_after, job, status)

    async def run(self, job: Job, fn, *args, hung_up=None):
        """Run ``fn(*args)`` for an admitted ``job`` on the model thread. ``hung_up``: an awaitable that
        completes when the client disconnects; the job is then cancelled (see the module docstring)."""
        loop = asyncio.get_running_loop()

        def work():
            with self._lock:
                if job.cancel.is_set():
                    raise Cancelled(f"job {job.id} cancelled before it ran")
                job.state, job.started = "running", time.time()
            start = time.perf_counter()
            result = fn(*args)
            seconds = time.perf_counter() - start
            with self._lock:
                if job.key in self._first:
                    self._durations.setdefault(job.key, deque(maxlen=20)).append(seconds)
                else:
                    self._first[job.key] = seconds
            return result

        future = loop.run_in_executor(self._executor, work)
        watcher = asyncio.ensure_future(hung_up) if hung_up is not None else None
        try:
            if watcher is not None:
                await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not future.done():
                    with self._lock:
                        job.cancel.set()
                        queued = job.state == "queued"
                    if queued:  # it never runs: the worker skips it, and the slot is free now
                        future.cancel()
                        raise Cancelled(f"job {job.id} cancelled before it ran")
                    logger.info("job %s (%s %s, user %s): client disconnected while running; stopping at the next "
                                "slice", job.id, job.kind, job.target, job.user)
            result = await future
        except (Cancelled, asyncio.CancelledError) as e:
            self._finish(job, "cancelled", str(e) or "cancelled")
            raise Cancelled(str(e)) from None
        except BaseException as e:
            self._finish(job, "failed", type(e).__name__)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        self._finish(job, "done")
        return result

    def _finish(self, job: Job, state: str, detail: str | None = None):
        job.state, job.finished, job.detail = state, time.time(), detail
        self._active.pop(job.id, None)
        self._finished.append(job)
        if state == "cancelled":
            ran = job.started is not None
            self.counts["cancelled_running" if ran else "cancelled_queued"] += 1
            logger.info("job %s (%s %s, user %s) cancelled %s: the client disconnected", job.id, job.kind,
                        job.target, job.user, f"after {job.progress.get('slices_done', 0)} slices" if ran
                        else "before it ran")
        else:
            self.counts[state] += 1

    # ------------------------------------------------------------------ what clients see
    def jobs(self) -> list[Job]:
        """Active jobs in queue order, then finished ones, newest first."""
        return [*list(self._active.values()), *reversed(list(self._finished))]

    def find(self, job_id: str) -> Job | None:
        return next((j for j in self.jobs() if j.id == job_id), None)

    def describe(self, job: Job, estimates: dict, owner_view: bool) -> dict:
        """A job as JSON; ``owner_view`` False (an admin looking at another user's job) leaves out the image."""
        position, eta = estimates.get(job.id, (None, None))
        out = {"id": job.id, "kind": job.kind, "model": job.target, "user": job.user, "state": job.state,
               "position": position, "submitted": round(job.submitted, 3),
               "started": None if job.started is None else round(job.started, 3),
               "finished": None if job.finished is None else round(job.finished, 3),
               "eta_s": None if eta is None else round(eta, 1), **job.progress}
        if job.detail:
            out["detail"] = job.detail
        if owner_view:
            out["image"] = job.image
        return out

    def summary(self) -> dict:
        means = {k: round(sum(runs) / len(runs), 2) for k in list(self._first) if (runs := self._runs(k))}
        return {"capacity": self.capacity, "per_user": self.per_user, "workers": self.workers, "depth": self.depth,
                "mean_run_s": means, "counts": dict(self.counts)}

    def shutdown(self):
        self._executor.shutdown(wait=False, cancel_futures=True)


TRAIN_STATES = {"SUBMITTED": "queued", "RUNNING": "running", "DONE": "done", "ERROR": "failed", "STOPPED": "cancelled"}


def training_jobs(tasks: list[dict]) -> list[dict]:
    """MONAI Label's training tasks (``background_tasks["train"]``: one worker, FIFO) as queue jobs, with
    positions and an ETA from the mean run time of the finished ones. MONAI Label records submission and end
    times only (to the second); a run starts when it is submitted or when the one before it ends."""
    from datetime import datetime

    def stamp(text):
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").timestamp() if text else None

    rows, previous_end = [], None
    for task in tasks:
        submitted, finished = stamp(task.get("start_ts")), stamp(task.get("end_ts"))
        state = TRAIN_STATES.get(task.get("status"), str(task.get("status", "")).lower())
        started = max(submitted, previous_end or submitted) if state != "queued" else None
        previous_end = finished or previous_end
        rows.append({"id": task.get("id"), "kind": "train", "model": (task.get("request") or {}).get("model"),
                     "user": None, "state": state, "submitted": submitted, "started": started, "finished": finished})
    runs = [r["finished"] - r["started"] for r in rows if r["state"] == "done" and r["started"] is not None]
    mean = sum(runs) / len(runs) if runs else None
    now, ahead, waiting = time.time(), 0.0, 0
    for row in rows:
        row["position"] = row["eta_s"] = None
        if row["state"] not in ACTIVE:
            continue
        own = mean if row["state"] == "queued" else (None if mean is None else max(0.0, mean - (now - row["started"])))
        row["position"] = 0 if row["state"] == "running" else (waiting := waiting + 1)
        if mean is not None:
            row["eta_s"] = round(ahead + own, 1)
            ahead += own
    return rows
