"""The model queue of serve.py against the real RadDiag app (randomly initialised demo model, whole-volume CT
answers of several seconds on CPU): job ids, `GET /queue/` positions and ETAs from measured run times,
Retry-After on 503/429 from the same estimate, the per-user share, and clients that hang up losing their slot
(before their job runs, and while it runs, at the next slice)."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serving_helpers import bearer, make_users, send_infer, start_serve

from server.auth import add_user

app_studies = pytest.importorskip("app_studies")

# whole ct_liver volume, one slice per batch (a progress report each); sampled, so a repeat request decodes in full
# (a greedy repeat is verified in one pass from the slice cache's drafts, far too quick to queue behind)
VOLUME = {"max_new_tokens": 48, "batch_size": 1, "do_sample": True}  # ~0.3 s a slice on 2 quiet cores
SLICE = {"max_new_tokens": 8, "slice": 3}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("queue")
    app_studies.write_studies(root / "studies")
    model = app_studies.random_model_dir(root / "model")
    tokens = make_users(root / "auth.json")
    tokens["bob"] = add_user(root / "auth.json", "bob", "user")
    server = start_serve(app_studies.APP_DIR, root / "studies", root / "auth.json", tokens["user"],
                         conf={"model_path": model, "work_dir": root / "work"},
                         extra=["--max-queue", "4", "--max-queue-per-user", "2"], timeout=300)
    yield {"url": server.url, "tokens": tokens, "server": server, "root": root}
    server.stop()


def infer(served, who, params, image="ct_liver"):
    return requests.post(f"{served['url']}/infer/raddiagseg", params={"image": image, "output": "json"},
                         headers=bearer(served["tokens"][who]), data={"params": json.dumps(params)}, timeout=600)


def queue(served, who, job_id=""):
    reply = requests.get(f"{served['url']}/queue/{job_id}", headers=bearer(served["tokens"][who]), timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def wait_for(condition, what, timeout=120, every=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def active(served, who="admin"):
    return [j for j in queue(served, who)["jobs"] if j["state"] in ("queued", "running") and j["kind"] == "infer"]


def running_with_progress(served):
    jobs = [j for j in active(served) if j["state"] == "running" and j.get("slices_done", 0) >= 1]
    return jobs[0] if jobs else None


class HangingClient:
    """An infer request that waits for its answer until `hang_up()` closes the connection."""

    def __init__(self, served, who, params):
        self.sock = send_infer(served["url"], bearer(served["tokens"][who]), "ct_liver", params)

    def hang_up(self):
        self.sock.close()


def test_jobs_report_place_eta_and_retry_after_from_measured_runs_with_a_per_user_share(served):
    first = infer(served, "user", VOLUME)  # loads the model
    assert first.status_code == 200, served["server"].log()
    warm = infer(served, "user", VOLUME)
    assert warm.status_code == 200
    job = queue(served, "user", warm.headers["X-Job-Id"])
    assert job["state"] == "done" and job["image"] == "ct_liver" and job["slices_done"] == job["n_slices"] == 10
    measured = job["finished"] - job["started"]
    assert measured > 1.0
    # another user cannot see it; an admin sees it without the image
    other = requests.get(f"{served['url']}/queue/{job['id']}", headers=bearer(served["tokens"]["bob"]), timeout=30)
    assert other.status_code == 404 and "no job" in other.json()["detail"]
    assert "image" not in queue(served, "admin", job["id"]) and queue(served, "admin", job["id"])["user"] == "user1"

    with ThreadPoolExecutor(4) as pool:
        long_run = pool.submit(infer, served, "user", VOLUME)
        wait_for(lambda: running_with_progress(served), "the first job to report slices")
        second = pool.submit(infer, served, "user", VOLUME)
        mine = wait_for(lambda: len(active(served, "user")) == 2 and active(served, "user"), "user1's second job")
        assert [j["position"] for j in mine] == [0, 1] and [j["state"] for j in mine] == ["running", "queued"]
        assert mine[0]["eta_s"] < mine[1]["eta_s"] and mine[1]["eta_s"] >= measured * 0.9  # its own run is ahead of it

        over_share = infer(served, "user", SLICE)  # user1 holds its 2 of 4 slots
        assert over_share.status_code == 429 and "user 'user1' already has 2" in over_share.json()["detail"]
        assert int(over_share.headers["Retry-After"]) >= 1
        assert queue(served, "user", over_share.headers["X-Job-Id"])["state"] == "refused"

        others = [pool.submit(infer, served, "bob", VOLUME) for _ in range(2)]  # another user still gets in
        wait_for(lambda: len(active(served)) == 4, "bob's two jobs in the queue")
        assert len(active(served, "bob")) == 2 and all(j["user"] == "bob" for j in active(served, "bob"))
        refused_at = time.time()
        busy = infer(served, "admin", VOLUME)
        assert busy.status_code == 503 and "busy" in busy.json()["detail"]
        retry_after = int(busy.headers["Retry-After"])
        assert busy.json()["job"] == busy.headers["X-Job-Id"]
        assert retry_after >= measured, (retry_after, measured)  # not a constant: at least one measured run

        listing = queue(served, "admin")
        text = json.dumps(listing)
        assert str(served["root"]) not in text and served["tokens"]["bob"] not in text
        assert {j["user"] for j in listing["jobs"]} >= {"user1", "bob", "admin1"}
        assert all("image" not in j for j in listing["jobs"] if j["user"] != "admin1")
        assert all(j["user"] == "user1" for j in queue(served, "user")["jobs"])

        replies = [long_run.result(), second.result(), *[f.result() for f in others]]
    drained = time.time() - refused_at
    assert [r.status_code for r in replies] == [200] * 4
    print(f"\nmeasured run {measured:.1f} s; 503 Retry-After {retry_after} s; queue drained {drained:.1f} s later")
    assert queue(served, "admin")["counts"]["refused"] >= 2


def test_a_client_that_hangs_up_loses_its_slot(served):
    assert infer(served, "user", SLICE).status_code == 200  # the model is loaded
    with ThreadPoolExecutor(2) as pool:
        long_run = pool.submit(infer, served, "user", VOLUME)  # a client that waits
        wait_for(lambda: running_with_progress(served), "the long job to run")
        before = {j["id"] for j in active(served)}
        hanging = [HangingClient(served, who, VOLUME) for who in ("user", "bob", "bob")]
        waiting = wait_for(lambda: len(active(served)) == 4 and [j for j in active(served) if j["id"] not in before],
                           "three queued jobs")
        for client in hanging:
            client.hang_up()
        # their slots free at once, while the long job still runs; they never start
        gone = wait_for(lambda: all(queue(served, "admin", j["id"])["state"] == "cancelled" for j in waiting)
                        and [queue(served, "admin", j["id"]) for j in waiting], "the hung-up jobs to be dropped", 10)
        assert all(j["started"] is None for j in gone)
        assert [j["state"] for j in active(served)] == ["running"] and not long_run.done()
        fresh = infer(served, "bob", SLICE)
        assert long_run.result().status_code == 200 and fresh.status_code == 200
    long_job, fresh_job = (queue(served, "admin", r.headers["X-Job-Id"]) for r in (long_run.result(), fresh))
    assert fresh_job["started"] - long_job["finished"] < 1.0  # next after the long job, not after the hung-up ones
    log = served["server"].log(200_000)
    for job in waiting:
        assert f"job {job['id']} (infer raddiagseg, user {job['user']}) cancelled before it ran" in log

    # hanging up while its job runs: the model stops at the next slice and the next request runs
    client = HangingClient(served, "user", VOLUME)
    job = wait_for(lambda: running_with_progress(served), "the hanging client's job to run")
    hung_up_at = time.time()
    client.hang_up()
    stopped = wait_for(lambda: queue(served, "admin", job["id"])["state"] == "cancelled"
                       and queue(served, "admin", job["id"]), "the running job to stop", 30)
    assert stopped["slices_done"] < stopped["n_slices"] and stopped["finished"] - hung_up_at < 5.0, stopped
    from monailabel.client import MONAILabelClient

    stock = MONAILabelClient(served["url"])
    stock.update_auth({"token_type": "Bearer", "access_token": served["tokens"]["bob"]})
    _, answer = stock.infer("raddiagseg", "ct_liver", SLICE)
    assert isinstance(answer["answer"], str)
    assert f"job {job['id']} (infer raddiagseg, user user1) cancelled after {stopped['slices_done']} slices" in \
        served["server"].log(200_000)
    counts = queue(served, "admin")["counts"]
    assert counts["cancelled_queued"] == 3 and counts["cancelled_running"] == 1


def test_slicer_panel_shows_slices_done_and_time_left_of_a_whole_volume(served, monkeypatch):
    """Issue 23: the RadDiag module's diagnose job (RadDiagLib, as the panel runs it) reports the server's progress
    on a whole volume while the request waits: slices answered of planned and the time left, read from GET /queue/."""
    from RadDiagLib import DEFAULT_QUESTION, BackgroundJob, RadDiagClient, diagnose, volume_progress

    monkeypatch.setattr(volume_progress, "POLL_S", 0.2)
    client = RadDiagClient(served["url"], token=served["tokens"]["annotator"])
    path = str(served["root"] / "studies" / "ct_liver.nii.gz")
    job = BackgroundJob(lambda ctx: diagnose(client, "raddiagseg", path, "ct_liver", DEFAULT_QUESTION, context=ctx,
                                             options={**VOLUME, "skip_slices": False}), name="diagnose").start()
    updates = []
    while not job.finished:
        updates += job.poll()
        time.sleep(0.05)
    updates += job.poll()
    assert job.state == "done", job.error
    n = job.result.params["volume"]["n_slices"]
    counted = [(f, m) for f, m in updates if re.fullmatch(rf"\d+ of \d+ slices answered( \(volume of {n} slices\))?"
                                                            r"(, (about (\d+ min( \d+ s)?|\d+ s)|under a second) left)?\.", m or "")]
    assert counted and any(m.endswith(" left.") for _, m in counted), updates
    done = [int(m.split()[0]) for _, m in counted]
    fractions = [f for f, _ in counted]
    assert done == sorted(done) and fractions == sorted(fractions) and 0.25 <= fractions[0] <= fractions[-1] <= 0.85
    assert updates[-1] == (1.0, "Done")


def test_queue_share_must_fit_the_queue(tmp_path):
    import subprocess
    import sys

    from serving_helpers import SERVE

    config = tmp_path / "auth.json"
    add_user(config, "alice", "admin")
    bad = subprocess.run([sys.executable, str(SERVE), "--studies", str(tmp_path), "--auth-config", str(config),
                          "--max-queue", "4", "--max-queue-per-user", "5"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--max-queue-per-user must be between 1 and --max-queue" in bad.stderr
