#!/usr/bin/env python
"""Fairness and honesty of serve.py's model queue, measured on loopback with the real app (issues 18.10, 19).

    .venv/bin/python benchmarks/queue_fairness.py                      # this checkout
    .venv/bin/python benchmarks/queue_fairness.py --repo /work/main    # another checkout's serve.py ("before")

Model as in benchmarks/load.py (the shipped demo model); the study is a 32-slice 128 x 128 phantom CT, asked about as
a whole volume (about 19 slices answered; 4-5 s with its image features cached, 15-19 s without, on 2 CPU cores).
Three parts, each on a fresh server:

1. retry: capacity 2 (both for one user). Each run: user A asks 6 single slices (a mixed load, as in issue 19's
   "3 s while the last accepted request took 137 s"), then fills the queue with two whole-volume answers; user B asks a
   third and gets 503, then re-sends every 0.25 s until accepted. Every whole-volume request has its own display
   window, so none reuses cached features. Prints Retry-After against B's actual wait (503 -> accepted, -> answered).
2. abandoned: capacity 10; one whole-volume request that waits, then N clients send whole-volume requests and hang up
   after 1 s, then a fresh one-slice request. Counts the abandoned requests the model still ran (the app's log line
   per answer) and the fresh request's latency.
3. share: capacity 4; user A sends 6 whole-volume requests at once, user B 2 half a second later; status codes per user.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk
from load import prepare, start, wait_ready
from repo_paths import ROOT
from serving_helpers import send_infer

VOLUME = {"max_new_tokens": 16, "batch_size": 1}
SLICE = {"max_new_tokens": 16, "slice": 2}
STUDY = "ctbig"
ANSWER_LINE = "raddiagseg: "  # the app logs one line per answer (lib/infers/raddiagseg.py)


class Server:
    def __init__(self, repo: Path, work: Path, studies, model, capacity, per_user=None):
        from server.auth import add_user

        self.work = work
        self.tokens = {name: add_user(work / "auth.json", name, "user") for name in ("alice", "bob")}
        shares = "--max-queue-per-user" in (repo / "MONAILabelApp" / "serve.py").read_text()  # not before issue 18.10
        extra = ["--max-queue-per-user", str(per_user)] if per_user and shares else []
        self.process, self.url = start(work, studies, model, capacity, app=repo / "MONAILabelApp", extra=extra,
                                       log_level="info")
        wait_ready(self.url, self.headers("alice"), self.process)

    def headers(self, who):
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def infer(self, who, params):
        return requests.post(f"{self.url}/infer/raddiagseg", params={"image": STUDY, "output": "json"},
                             headers=self.headers(who), data={"params": json.dumps(params)}, timeout=900)

    def answers_logged(self):
        return (self.work / "server.log").read_text(errors="replace").count(ANSWER_LINE)

    def stop(self):
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=60)


def hang_up_after(server, who, params, seconds):
    """An infer request closed after `seconds` without reading the answer."""
    with send_infer(server.url, server.headers(who), STUDY, params):
        time.sleep(seconds)


def settle(server, quiet_s=15, limit_s=300):
    """Wait until no new answer has been logged for quiet_s (the model is idle)."""
    last, since, deadline = server.answers_logged(), time.time(), time.time() + limit_s
    while time.time() < deadline and time.time() - since < quiet_s:
        time.sleep(1)
        now = server.answers_logged()
        if now != last:
            last, since = now, time.time()
    return last


def write_study(studies: Path):
    from raddiagseg.data import phantoms

    ct = phantoms.generate_ct(np.random.default_rng(1), "liver", size=128, slices=32, tumours=1)
    volume = sitk.GetImageFromArray(ct.hu.astype(np.int16))
    volume.SetSpacing(tuple(float(s) for s in reversed(ct.spacing)))
    sitk.WriteImage(volume, str(studies / f"{STUDY}.nii.gz"))


def part_retry(server, runs):
    windows = iter(range(1, 10_000))

    def cold():  # a display window of its own: no cached image features
        return {**VOLUME, "window": [40 + 0.01 * next(windows), 400]}

    assert server.infer("alice", cold()).status_code == 200  # loads the model
    rows = []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(runs):
            for _ in range(6):
                assert server.infer("alice", SLICE).status_code == 200
            ahead = [pool.submit(server.infer, "alice", cold()) for _ in range(2)]
            time.sleep(1.0)
            refused = server.infer("bob", cold())
            t0 = time.perf_counter()
            if refused.status_code != 503:
                rows.append(None)
                [f.result() for f in ahead]
                continue
            retry_after, accepted_last_503 = int(refused.headers["Retry-After"]), 0.0
            mine = cold()
            while True:
                reply = server.infer("bob", mine)  # a 503 comes back at once; an accepted one after its answer
                if reply.status_code != 503:
                    break
                accepted_last_503 = time.perf_counter() - t0
                time.sleep(0.25)
            answered = time.perf_counter() - t0
            [f.result() for f in ahead]
            rows.append((retry_after, accepted_last_503, answered, reply.status_code))
    return rows


def part_abandoned(server, n):
    assert server.infer("alice", SLICE).status_code == 200
    before = server.answers_logged()
    with ThreadPoolExecutor(n + 1) as pool:
        waiting = pool.submit(server.infer, "alice", VOLUME)
        time.sleep(1.0)
        hung = [pool.submit(hang_up_after, server, ("alice", "bob")[i % 2], VOLUME, 1.0) for i in range(n)]
        [f.result() for f in hung]
        t = time.perf_counter()
        fresh = server.infer("bob", SLICE)
        fresh_s = time.perf_counter() - t
        waited = waiting.result()
    total = settle(server)
    ran = total - before - 2  # less the waiting request and the fresh one
    return {"abandoned": n, "ran": ran, "fresh_s": fresh_s, "codes": (waited.status_code, fresh.status_code)}


def part_share(server):
    assert server.infer("alice", SLICE).status_code == 200
    with ThreadPoolExecutor(8) as pool:
        a = [pool.submit(server.infer, "alice", VOLUME) for _ in range(6)]
        time.sleep(0.5)
        b = [pool.submit(server.infer, "bob", VOLUME) for _ in range(2)]
        codes = {"alice": sorted(f.result().status_code for f in a), "bob": sorted(f.result().status_code for f in b)}
    return codes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout whose MONAILabelApp/serve.py is measured")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--abandoned", type=int, default=8)
    p.add_argument("--parts", default="retry,abandoned,share")
    args = p.parse_args()
    repo = args.repo.resolve()
    print(f"serve.py of {repo} (commit {subprocess.run(['git', '-C', str(repo), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()})")
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="raddiag-queue-") as tmp:
        base = Path(tmp)
        studies, model, _ = prepare(base)
        write_study(studies)
        for part, capacity in (("retry", 2), ("abandoned", args.abandoned + 2), ("share", 4)):
            if part not in parts:
                continue
            work = base / part
            work.mkdir()
            server = Server(repo, work, studies, model, capacity, per_user=2 if part == "retry" else None)
            try:
                if part == "retry":
                    for i, row in enumerate(part_retry(server, args.runs)):
                        if row is None:
                            print(f"retry run {i + 1}: no 503 (the queue was not full)")
                            continue
                        retry_after, accepted, answered, code = row
                        print(f"retry run {i + 1}: Retry-After {retry_after} s; accepted after {accepted:.1f} s, "
                              f"answered ({code}) after {answered:.1f} s")
                elif part == "abandoned":
                    r = part_abandoned(server, args.abandoned)
                    print(f"abandoned: {r['ran']} of {r['abandoned']} abandoned requests still ran; fresh one-slice "
                          f"request answered in {r['fresh_s']:.1f} s; codes (waiting, fresh) {r['codes']}")
                else:
                    codes = part_share(server)
                    print(f"share (capacity 4): alice 6 -> {codes['alice']}; bob 2 -> {codes['bob']}")
            finally:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
