"""How far the server is with a whole-volume answer, read from its job queue while the request waits.

A whole CT volume is one infer request of minutes on a CPU server. The team server (MONAILabelApp/serve.py)
lists each user's model jobs at `GET /queue/`: place in the queue, `eta_s`, and while the model runs the slices
answered so far (`slices_done` of `slices_planned`; more are planned as abnormal slices' neighbours and the organ's
outline are asked). `QueueWatcher` polls it from its own thread while the request runs and reports
(fraction, message) for the panel's progress bar and status line. A server without a queue (plain
`monailabel start_server` answers 404) simply shows no progress.
"""

import threading

import requests

from .client import RadDiagClient

STAGES = {"slices": "slices", "neighbours": "slices next to abnormal ones", "organ": "slices outlining the organ"}
START, END = 0.25, 0.85  # the part of the panel's progress bar that the model's work fills
POLL_S = 1.0  # seconds between two looks at the queue


def duration(seconds):
    """'about 1 min 20 s' / 'about 45 s' / 'under a second'."""
    seconds = int(round(float(seconds)))
    if seconds < 1:
        return "under a second"
    minutes, rest = divmod(seconds, 60)
    if not minutes:
        return f"about {rest} s"
    return f"about {minutes} min {rest} s" if rest else f"about {minutes} min"


def job_progress(job):
    """(fraction of the progress bar or None, message) for a queue entry of an infer job."""
    eta = job.get("eta_s")
    left = f", {duration(eta)} left" if isinstance(eta, (int, float)) and not isinstance(eta, bool) else ""
    if job.get("state") == "queued":
        place = job.get("position")
        place = f" (place {place})" if isinstance(place, int) and not isinstance(place, bool) else ""
        return None, f"Waiting in the server's queue{place}{left}."
    done, planned = job.get("slices_done"), job.get("slices_planned")
    if not isinstance(done, int) or not isinstance(planned, int) or planned < 1:
        return None, f"The model is reading the volume{left}."
    what = STAGES.get(job.get("stage"), "slices")
    total = job.get("n_slices")
    of = f" (volume of {total} slices)" if isinstance(total, int) and total != planned else ""
    return START + (END - START) * min(done, planned) / planned, f"{done} of {planned} {what} answered{of}{left}."


def active_job(jobs, image_id):
    """The newest queued or running infer job about `image_id` in a `GET /queue/` listing, or None."""
    mine = [j for j in jobs if isinstance(j, dict) and j.get("kind") == "infer" and j.get("image") == image_id
            and j.get("state") in ("queued", "running")]
    return max(mine, key=lambda j: j.get("submitted") or 0.0) if mine else None


class QueueWatcher:
    """Reports the progress of this user's infer job about `image_id` every `poll_s` seconds until `stop()`.

    Uses its own HTTP session (the request it watches holds the client's). `report(fraction, message)` is the
    job context's progress; the bar never moves back when the server plans more slices."""

    def __init__(self, client, image_id, report, poll_s=None):
        self.client = RadDiagClient(client.server_url, token=client.token, timeout=client.timeout,
                                    session=_session_like(client.session))
        self.image_id, self.report, self.poll_s = image_id, report, POLL_S if poll_s is None else poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="RadDiag-queue-watcher", daemon=True)
        self.last = None  # the last (fraction, message) reported

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(self.poll_s + 1.0)
        self.client.session.close()

    def _run(self):
        shown = 0.0
        while not self._stop.wait(self.poll_s):
            try:
                jobs = self.client.queue_jobs()
            except Exception:  # ServerError, or the session closed by stop(): progress is a courtesy, the request
                return  # itself reports what went wrong
            if jobs is None:
                return  # a server without a job queue
            job = active_job(jobs, self.image_id)
            if job is None or self._stop.is_set():
                continue
            fraction, message = job_progress(job)
            if fraction is not None:
                shown = fraction = max(shown, fraction)
            self.last = (fraction, message)
            try:
                self.report(fraction, message)
            except Exception:  # the user cancelled (the job context raises): stop watching
                return


def _session_like(session):
    """A new session with the settings of `session` (headers, TLS verification and client certificate, proxies)."""
    fresh = requests.Session()
    fresh.headers.update(session.headers)
    fresh.verify, fresh.cert, fresh.proxies, fresh.trust_env = session.verify, session.cert, session.proxies, session.trust_env
    return fresh
