#!/usr/bin/env python
"""Load test of the team server: N clients x M inference requests on loopback through
MONAILabelApp/serve.py, while a monitor polls /info/ to show the server stays responsive.

    .venv/bin/python benchmarks/load.py                       # 8 clients x 25 requests, real app
    .venv/bin/python benchmarks/load.py --url https://host --token T --image ID   # an existing server

Without --url it starts serve.py on a free port with the real MONAILabelApp, the shipped demo
model (or a randomly initialised demo-preset model when none is shipped; answers are then
gibberish but the work per request is real) and a phantom chest X-ray + CT volume it generates.

--mode cold (default): every request asks about a CT slice (rotating over the volume) with its
own display window, so no request can reuse cached image features: both encoders, the LM and
the mask decoder run each time. --mode cached: every request asks about the same X-ray, so after
the first one only the LM and mask decoder run (the feature cache path).

Prints the number of errors (any non-200, including 503 from a full queue), inference latency
p50/p95 and /info/ latency p50/p95/max during the load (target: /info/ p95 <= 100 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from repo_paths import ROOT
APP = ROOT / "MONAILabelApp"
SHIPPED_MODEL = APP / "model" / "raddiagseg-demo"


def percentile(values, q):
    return float(np.percentile(np.asarray(values, float), q)) if values else float("nan")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(work: Path):
    """Studies (a phantom X-ray and CT), a model folder and a user token for a local server."""
    import SimpleITK as sitk

    from raddiagseg.data import phantoms

    studies = work / "studies"
    studies.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xray = phantoms.generate_xray(rng, "COVID-19", size=128)
    sitk.WriteImage(sitk.GetImageFromArray(xray.image), str(studies / "cxr.png"))
    ct = phantoms.generate_ct(rng, "liver", size=96, slices=6, tumours=1)
    volume = sitk.GetImageFromArray(ct.hu.astype(np.int16))
    volume.SetSpacing(tuple(float(s) for s in reversed(ct.spacing)))
    sitk.WriteImage(volume, str(studies / "ct.nii.gz"))
    model = SHIPPED_MODEL
    if not (model / "config.json").is_file():
        import raddiagseg

        model = work / "model"
        raddiagseg.build_model("demo").save_pretrained(str(model))
        print(f"no shipped demo model: serving a randomly initialised demo-preset model from {model}")
    from server.auth import add_user

    token = add_user(work / "auth.json", "bench", "user")
    return studies, model, token


def start(work, studies, model, max_queue, app=APP, extra=None, log_level="warning"):
    """serve.py of the app folder `app` (another checkout's, to compare) on a free port; its output in work/server.log.
    `extra` serve.py arguments; by default one user may hold the whole queue (the benchmark user stands in for a team)."""
    port = free_port()
    extra = ["--max-queue-per-user", str(max_queue)] if extra is None else list(extra)
    cmd = [sys.executable, str(app / "serve.py"), "--app", str(app), "--studies", str(studies), "--port", str(port),
           "--auth-config", str(work / "auth.json"), "--max-queue", str(max_queue), "--log-level", log_level, *extra,
           "--conf", "model_path", str(model), "--conf", "work_dir", str(work / "work")]
    log = open(work / "server.log", "wb")
    # the checkout's own app and trainer code, not this one's
    env = {**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false",
           "PYTHONPATH": os.pathsep.join([str(app.parent / "trainer"), str(app)])}
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(url, headers, process=None, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            if requests.get(url + "/info/", headers=headers, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} did not answer /info/ within {timeout}s")


def request_params(mode, base, i, n_slices):
    """The params of request number i: cold = a new CT slice/window pair every time, cached = the same every time."""
    if mode == "cached":
        return base
    return {**base, "slice": i % n_slices, "window": [40 + 0.001 * i, 400]}


def run_load(url, headers, image, clients, per_client, params, mode="cached", n_slices=1, retry_busy=False):
    """Returns latencies, errors, /info/ times, wall time, encoder runs per answer and the 503 replies seen.
    With retry_busy a client that gets 503 waits Retry-After seconds and sends the request again
    (its latency includes the wait); otherwise a 503 counts as an error."""
    latencies, errors, info_times, encoded, busy = [], [], [], [], []
    stop = threading.Event()

    def monitor():
        session = requests.Session()
        while not stop.is_set():
            start = time.perf_counter()
            try:
                ok = session.get(url + "/info/", headers=headers, timeout=30).status_code == 200
            except requests.RequestException:
                ok = False
            info_times.append(time.perf_counter() - start)
            if not ok:
                errors.append("info")
            stop.wait(0.1)

    def client(i):
        session = requests.Session()
        for k in range(per_client):
            sent = request_params(mode, params, i * per_client + k + 1, n_slices)
            start = time.perf_counter()
            try:
                while True:
                    reply = session.post(url + f"/infer/raddiagseg?image={image}&output=json", headers=headers,
                                         data={"params": json.dumps(sent)}, timeout=600)
                    if reply.status_code not in (429, 503):  # queue full, or this user's share of it
                        break
                    busy.append(int(reply.headers.get("Retry-After") or 0))
                    if not retry_busy:
                        break
                    time.sleep(float(reply.headers.get("Retry-After") or 1))
                if reply.status_code != 200:
                    errors.append(f"{reply.status_code}: {reply.text[:120]}")
                else:
                    encoded.append(int((reply.json().get("feature_cache") or {}).get("encoded", -1)))
            except requests.RequestException as e:
                errors.append(type(e).__name__)
            latencies.append(time.perf_counter() - start)

    # one warm-up request loads the model, outside the measurement
    warm = requests.post(url + f"/infer/raddiagseg?image={image}&output=json", headers=headers,
                         data={"params": json.dumps(request_params(mode, params, 0, n_slices))}, timeout=600)
    if warm.status_code != 200:
        raise SystemExit(f"the warm-up request failed: {warm.status_code} {warm.text[:300]}")
    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    return latencies, errors, info_times, wall, encoded, busy


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="per client")
    p.add_argument("--url", help="an already running server (then give --token and --image)")
    p.add_argument("--token")
    p.add_argument("--mode", choices=["cold", "cached"], default="cold",
                   help="cold: a new CT slice/window per request (encoders always run); cached: the same X-ray")
    p.add_argument("--image", help="datastore id to ask about (default: ct for --mode cold, cxr for --mode cached)")
    p.add_argument("--slices", type=int, default=6, help="--mode cold: slices to rotate over (default: the generated CT's 6)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=16, help="serve.py --max-queue (running + waiting before 503)")
    p.add_argument("--retry-busy", action="store_true", help="on 503, wait Retry-After and send again (else: an error)")
    args = p.parse_args()

    process = None
    with tempfile.TemporaryDirectory(prefix="raddiag-load-") as tmp:
        if args.url:
            if not args.token:
                raise SystemExit("--url needs --token")
            url, token = args.url.rstrip("/"), args.token
        else:
            work = Path(tmp)
            studies, model, token = prepare(work)
            process, url = start(work, studies, model, args.max_queue)
        headers = {"Authorization": f"Bearer {token}"}
        try:
            wait_ready(url, headers, process)
            params = {"question": "Is there an abnormality? What is it? Segment it.", "max_new_tokens": args.max_new_tokens}
            image = args.image or ("ct" if args.mode == "cold" else "cxr")
            latencies, errors, info_times, wall, encoded, busy = run_load(
                url, headers, image, args.clients, args.requests, params, args.mode, args.slices, args.retry_busy)
        finally:
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
    n = args.clients * args.requests
    print(f"load: {args.clients} clients x {args.requests} infer requests = {n} on {url} (mode {args.mode}, image "
          f"{image}, max_new_tokens {args.max_new_tokens}, max queue {args.max_queue}) in {wall:.1f} s, "
          f"{n / wall:.2f} req/s")
    print(f"errors: {len(errors)}" + (f"  first: {errors[:3]}" if errors else ""))
    if busy:
        print(f"503 busy replies: {len(busy)} (Retry-After {min(busy)}..{max(busy)} s)"
              + (", each retried after Retry-After" if args.retry_busy else ""))
    print(f"image encoders ran in {sum(e > 0 for e in encoded)} of {len(encoded)} answered requests "
          f"(the others reused cached features)")
    print(f"infer latency: p50 {percentile(latencies, 50) * 1000:.0f} ms, p95 {percentile(latencies, 95) * 1000:.0f} ms")
    p95 = percentile(info_times, 95) * 1000
    print(f"/info/ during load ({len(info_times)} polls): p50 {percentile(info_times, 50) * 1000:.1f} ms, "
          f"p95 {p95:.1f} ms, max {max(info_times) * 1000:.1f} ms  (target p95 <= 100 ms: "
          f"{'met' if p95 <= 100 else 'NOT met'})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
