"""Team serving through MONAILabelApp/serve.py: auth and roles, CORS, bad input, the inference
queue, responsiveness, token hygiene in logs. Runs MONAI Label's real app around a tiny stand-in
model (tests/helpers/serving_helpers.py) so every check is fast on CPU."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from serving_helpers import SERVE, bearer, make_users, start_serve, volume, write_image, write_stub_app

from server.auth import AuthConfigError, TokenStore, add_user, hash_token

ALLOWED_ORIGIN = "https://viewer.example.org"
DELAY_S = 1.0  # stand-in model runtime, so queueing and responsiveness are observable


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("serving")
    app = write_stub_app(base / "app")
    studies = base / "studies"
    studies.mkdir()
    write_image(studies / "ct1.nii.gz")
    write_image(studies / "ct2.nii.gz", volume(seed=1))
    auth = base / "auth.json"
    tokens = make_users(auth)
    server = start_serve(app, studies, auth, tokens["user"], conf={"delay": DELAY_S},
                         extra=["--max-queue", "2", "--max-queue-per-user", "2", "--max-upload-mb", "1",
                                "--cors-origin", ALLOWED_ORIGIN])
    yield {"url": server.url, "tokens": tokens, "studies": studies, "base": base, "server": server}
    server.stop()


def h(env, role):
    return bearer(env["tokens"][role])


def still_serving(env):
    reply = requests.get(env["url"] + "/info/", headers=h(env, "user"), timeout=10)
    assert reply.status_code == 200, env["server"].log()


# ---------------------------------------------------------------- auth

ENDPOINTS = [
    ("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/info/"), ("POST", "/infer/raddiagseg?image=ct1"),
    ("GET", "/datastore/"), ("GET", "/datastore/image?image=ct1"), ("HEAD", "/datastore/image?image=ct1"),
    ("GET", "/datastore/image/info?image=ct1"), ("PUT", "/datastore/image"), ("DELETE", "/datastore/image?id=ct1"),
    ("PUT", "/datastore/label?image=ct1"), ("GET", "/datastore/label?label=ct1&tag=final"),
    ("DELETE", "/datastore/label?id=ct1&tag=final"), ("PUT", "/datastore/label/info?label=ct1&tag=final"),
    ("GET", "/datastore/dataset"), ("GET", "/train/"), ("POST", "/train/raddiagseg"), ("DELETE", "/train/"),
    ("POST", "/activelearning/first"), ("GET", "/model/raddiagseg"), ("PUT", "/model/raddiagseg"),
    ("DELETE", "/model/raddiagseg"), ("GET", "/scoring/"), ("GET", "/batch/infer"), ("GET", "/logs/"),
    ("POST", "/reload"), ("GET", "/session/abc"), ("GET", "/proxy/dicom/qido/studies"), ("GET", "/static/favicon.ico"),
    ("GET", "/ohif/"), ("GET", "/queue/"), ("GET", "/queue/abc"), ("GET", "/auth/token/valid"),
    ("GET", "/no/such/endpoint"),
]


def test_the_health_check_and_the_stock_plugins_sign_in_are_the_only_open_endpoints(env):
    reply = requests.get(env["url"] + "/health", timeout=10)
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}
    reply = requests.get(env["url"] + "/auth/", timeout=10)  # MONAI Label's plugin then shows its sign-in dialog
    assert reply.status_code == 200 and reply.json()["enabled"] is True
    token = env["tokens"]["annotator"]
    for form in ({"username": "annotator1", "password": "wrong"}, {"username": "user1", "password": token},
                 {"username": "annotator1"}, {"password": token}, {}):
        reply = requests.post(env["url"] + "/auth/token", data=form, timeout=10)
        assert reply.status_code == 401 and "user name and token do not match" in reply.json()["detail"], form
    reply = requests.post(env["url"] + "/auth/token", data={"username": "annotator1", "password": "x" * 5000}, timeout=10)
    assert reply.status_code == 413
    # the answer is the token itself: signing in grants nothing more than the token does
    reply = requests.post(env["url"] + "/auth/token", data={"username": "annotator1", "password": token,
                                                            "grant_type": "password"}, timeout=10)
    assert reply.status_code == 200 and reply.json() == {"access_token": token, "token_type": "bearer"}
    valid = requests.get(env["url"] + "/auth/token/valid", headers=bearer(token), timeout=10)
    assert valid.status_code == 200 and valid.json() == {"username": "annotator1", "roles": ["annotator"]}
    assert requests.post(env["url"] + "/train/raddiagseg", headers=bearer(token), timeout=10).status_code == 403


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_every_endpoint_without_a_valid_token_is_401(env, method, path):
    for headers in ({}, bearer("not-a-token"), {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}):
        reply = requests.request(method, env["url"] + path, headers=headers, timeout=10)
        assert reply.status_code == 401, (method, path, headers, reply.text)
        assert reply.headers.get("www-authenticate") == "Bearer"
        if method != "HEAD":
            assert "Bearer" in reply.json()["detail"]


@pytest.mark.parametrize("method,path", [
    ("POST", "/train/raddiagseg"), ("POST", "/train/"), ("DELETE", "/train/"), ("DELETE", "/datastore/image?id=ct1"),
    ("DELETE", "/datastore/label?id=ct1&tag=final"), ("PUT", "/model/raddiagseg"), ("DELETE", "/model/raddiagseg"),
    ("GET", "/model/raddiagseg"), ("GET", "/logs/"), ("POST", "/reload"), ("POST", "/batch/infer/raddiagseg"),
])
def test_user_and_annotator_tokens_are_refused_admin_actions(env, method, path):
    for role in ("user", "annotator"):
        reply = requests.request(method, env["url"] + path, headers=h(env, role), timeout=10)
        assert reply.status_code == 403, (role, method, path, reply.text)
        assert "admin" in reply.json()["detail"]
    assert (env["studies"] / "ct1.nii.gz").exists()


def test_roles_allow_what_they_should(env):
    url = env["url"]
    assert requests.get(url + "/info/", headers=h(env, "user"), timeout=10).status_code == 200
    assert requests.get(url + "/datastore/?output=all", headers=h(env, "user"), timeout=10).status_code == 200
    label = env["base"] / "ct2_label.nii.gz"
    array = (sitk.GetArrayFromImage(volume(seed=1)) > 300).astype(np.uint8)
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(volume(seed=1))  # a label lies on its image's grid
    sitk.WriteImage(mask, str(label))
    with open(label, "rb") as f:  # a plain user cannot save labels
        reply = requests.put(url + "/datastore/label?image=ct2", headers=h(env, "user"), files={"label": f}, timeout=30)
    assert reply.status_code == 403
    with open(label, "rb") as f:  # an annotator can; the label is recorded under the authenticated name
        reply = requests.put(url + "/datastore/label?image=ct2&user=mallory", headers=h(env, "annotator"),
                             files={"label": ("ct2.nii.gz", f)}, data={"params": json.dumps({"answer": "1. No"})},
                             timeout=30)
    assert reply.status_code == 200, reply.text
    info = requests.get(url + "/datastore/label/info?label=ct2&tag=final", headers=h(env, "user"), timeout=10).json()
    assert info["user"] == "annotator1" and info["answer"] == "1. No"
    saved = requests.get(url + "/datastore/label?label=ct2&tag=final", headers=h(env, "user"), timeout=10)
    assert saved.status_code == 200
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(_write(env["base"] / "got.nii.gz", saved.content))))
    assert np.array_equal(got, array)


def _write(path, data):
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- CORS

def test_cors_preflight_from_an_unlisted_origin_is_refused(env):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    bad = requests.options(env["url"] + "/infer/raddiagseg", headers={"Origin": "https://evil.example.com", **preflight},
                           timeout=10)
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    good = requests.options(env["url"] + "/infer/raddiagseg", headers={"Origin": ALLOWED_ORIGIN, **preflight}, timeout=10)
    assert good.status_code == 200 and good.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    simple = requests.get(env["url"] + "/info/", headers={"Origin": "https://evil.example.com", **h(env, "user")}, timeout=10)
    assert "access-control-allow-origin" not in simple.headers


# ---------------------------------------------------------------- bad input

def _nifti_bytes(image):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        sitk.WriteImage(image, f"{d}/x.nii.gz")
        return Path(f"{d}/x.nii.gz").read_bytes()


def _png_bytes(array, rgb=False):
    import tempfile

    image = sitk.GetImageFromArray(array, isVector=rgb)
    with tempfile.TemporaryDirectory() as d:
        sitk.WriteImage(image, f"{d}/x.png")
        return Path(f"{d}/x.png").read_bytes()


def bad_input_cases():
    good = _nifti_bytes(volume())
    four_d = sitk.JoinSeries([volume(), volume(seed=2)])
    nan = sitk.GetImageFromArray(np.full((4, 8, 8), np.nan, np.float32))
    inf = sitk.GetImageFromArray(np.where(np.eye(8)[None] > 0, np.inf, 1.0).astype(np.float32).repeat(3, 0))
    rgb = _png_bytes(np.zeros((16, 16, 3), np.uint8), rgb=True)
    wide = _png_bytes(np.zeros((2, 9000), np.uint8))
    junk = np.random.default_rng(0).bytes(4000)
    gz_junk = gzip.compress(b"this is not an image header at all" * 20)
    big = b"\0" * (1024 * 1024 + 10)
    label_float = _nifti_bytes(sitk.GetImageFromArray(np.full((6, 24, 20), 0.5, np.float32)))
    label_small = _nifti_bytes(sitk.GetImageFromArray(np.ones((6, 12, 10), np.uint8)))
    label_ok = _nifti_bytes(sitk.GetImageFromArray(np.ones((6, 24, 20), np.uint8)))
    P = "/infer/raddiagseg"
    return [
        # (name, method, path, data-form, files)
        ("path as image id", "POST", P + "?image=/etc/passwd", None, None),
        ("relative path as image id", "POST", P + "?image=../studies/ct1", None, None),
        ("unknown image id", "POST", P + "?image=nope", None, None),
        ("unknown model", "POST", "/infer/other?image=ct1", None, None),
        ("params not JSON", "POST", P + "?image=ct1", {"params": "{question:"}, None),
        ("params a list", "POST", P + "?image=ct1", {"params": "[1, 2]"}, None),
        ("param device", "POST", P + "?image=ct1", {"params": '{"device": "cuda:7"}'}, None),
        ("param image path", "POST", P + "?image=ct1", {"params": '{"image": "/etc/passwd"}'}, None),
        ("unknown param", "POST", P + "?image=ct1", {"params": '{"model_path": "/tmp/evil"}'}, None),
        ("question too long", "POST", P + "?image=ct1", {"params": json.dumps({"question": "why? " * 1000})}, None),
        ("question empty", "POST", P + "?image=ct1", {"params": '{"question": "   "}'}, None),
        ("question not text", "POST", P + "?image=ct1", {"params": '{"question": 42}'}, None),
        ("negative max_new_tokens", "POST", P + "?image=ct1", {"params": '{"max_new_tokens": -5}'}, None),
        ("slice not a number", "POST", P + "?image=ct1", {"params": '{"slice": "abc"}'}, None),
        ("bad window", "POST", P + "?image=ct1", {"params": '{"window": [40, -1]}'}, None),
        ("image and file", "POST", P + "?image=ct1", None, {"file": ("a.nii.gz", good)}),
        ("no input", "POST", P, None, None),
        ("session id", "POST", P + "?session_id=abc", None, None),
        ("dicom seg output", "POST", P + "?image=ct1&output=dicom_seg", None, None),
        ("empty file", "POST", P, None, {"file": ("a.nii.gz", b"")}),
        ("random bytes as NIfTI", "POST", P, None, {"file": ("a.nii.gz", junk)}),
        ("gzip of text as NIfTI", "POST", P, None, {"file": ("a.nii.gz", gz_junk)}),
        ("truncated NIfTI", "POST", P, None, {"file": ("a.nii", _uncompressed(good)[:600])}),
        ("4D image", "POST", P, None, {"file": ("a.nii.gz", _nifti_bytes(four_d))}),
        ("RGB PNG", "POST", P, None, {"file": ("a.png", rgb)}),
        ("NaN-filled image", "POST", P, None, {"file": ("a.nii.gz", _nifti_bytes(nan))}),
        ("infinite values", "POST", P, None, {"file": ("a.nii.gz", _nifti_bytes(inf))}),
        ("oversized image", "POST", P, None, {"file": ("a.png", wide)}),
        ("text file", "POST", P, None, {"file": ("notes.txt", b"hello")}),
        ("text named .png", "POST", P, None, {"file": ("a.png", b"hello, not a png")}),
        ("upload over the size limit", "POST", P, None, {"file": ("a.nii", big)}),
        ("label float values", "PUT", "/datastore/label?image=ct1", None, {"label": ("l.nii.gz", label_float)}),
        ("label wrong size", "PUT", "/datastore/label?image=ct1", None, {"label": ("l.nii.gz", label_small)}),
        ("label for unknown image", "PUT", "/datastore/label?image=nope", None, {"label": ("l.nii.gz", label_ok)}),
        ("label tag path", "PUT", "/datastore/label?image=ct1&tag=../../etc", None, {"label": ("l.nii.gz", label_ok)}),
        ("label info not JSON", "PUT", "/datastore/label?image=ct1", {"params": "{"}, {"label": ("l.nii.gz", label_ok)}),
        ("new image id with path", "PUT", "/datastore/image?image=../../x", None, {"file": ("x.nii.gz", good)}),
        ("existing image id", "PUT", "/datastore/image?image=ct1", None, {"file": ("x.nii.gz", good)}),
        ("download by path", "GET", "/datastore/image?image=/etc/passwd", None, None),
        ("unknown strategy", "POST", "/activelearning/nope", None, None),
    ]


def _uncompressed(data):
    return gzip.decompress(data)


def test_bad_input_corpus_gets_4xx_with_a_message_and_server_keeps_serving(env):
    cases = bad_input_cases()
    assert len(cases) >= 25
    failures = []
    for name, method, path, data, files in cases:
        reply = requests.request(method, env["url"] + path, headers=h(env, "admin"), data=data, files=files, timeout=60)
        detail = reply.json().get("detail") if reply.headers.get("content-type", "").startswith("application/json") else None
        if not (400 <= reply.status_code < 500 and isinstance(detail, str) and len(detail) > 10):
            failures.append((name, reply.status_code, reply.text[:200]))
        still_serving(env)
    assert not failures, failures
    names = {p.name for p in env["studies"].iterdir()}
    assert {"ct1.nii.gz", "ct2.nii.gz"} <= names and not any(n.startswith("x") for n in names)


def test_valid_requests_still_work(env):
    url, headers = env["url"], h(env, "user")
    reply = requests.post(url + "/infer/raddiagseg?image=ct1&output=json", headers=headers,
                          data={"params": json.dumps({"question": "is it bright?", "max_new_tokens": 8})}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["answer"] == "bright is it bright?"
    with open(env["studies"] / "ct1.nii.gz", "rb") as f:
        reply = requests.post(url + "/infer/raddiagseg?output=image", headers=headers, files={"file": ("up.nii.gz", f)},
                              timeout=60)
    assert reply.status_code == 200
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(_write(env["base"] / "res.nii.gz", reply.content))))
    image = sitk.GetArrayFromImage(volume())
    assert np.array_equal(label, (image > image.mean()).astype(np.uint8))


# ---------------------------------------------------------------- responsiveness

def test_info_answers_while_a_model_runs(env):
    url = env["url"]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(requests.post, url + "/infer/raddiagseg?image=ct1&output=json", headers=h(env, "user"),
                              timeout=60)
        time.sleep(0.3)
        start = time.perf_counter()
        info = requests.get(url + "/info/", headers=h(env, "user"), timeout=10)
        datastore = requests.get(url + "/datastore/", headers=h(env, "user"), timeout=10)
        elapsed = time.perf_counter() - start
        assert info.status_code == 200 and datastore.status_code == 200
        assert not running.done(), "the inference finished before /info/ answered: nothing was shown"
        assert elapsed < DELAY_S / 2
        assert running.result().status_code == 200


def test_full_queue_answers_503_with_retry_after_and_accepted_requests_finish(env):
    url = env["url"]
    n = 6  # capacity is 2 (running + waiting)

    def infer(i):
        return requests.post(url + "/infer/raddiagseg?image=ct1&output=json", headers=h(env, "user"), timeout=60)

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(infer, range(n)))
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= 2 and set(codes) <= {200, 503}, codes
    busy = [r for r in replies if r.status_code == 503]
    assert busy, codes
    for r in busy:
        assert int(r.headers["Retry-After"]) >= 1 and "busy" in r.json()["detail"]
    assert time.perf_counter() - start < 20 * DELAY_S
    still_serving(env)


def test_training_runs_are_listed_in_the_queue_with_an_eta_once_one_has_run(env):
    """MONAI Label's own training tasks (one at a time, FIFO with enqueue=true) appear in GET /queue/ for admins."""
    url, admin = env["url"], h(env, "admin")

    def start():
        reply = requests.post(url + "/train/raddiagseg?enqueue=true", headers=admin, json={"steps": 10}, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()["id"]

    def train_jobs():
        return {j["id"]: j for j in requests.get(url + "/queue/", headers=admin, timeout=10).json()["jobs"]
                if j["kind"] == "train"}

    first, second = start(), start()
    jobs = train_jobs()
    # MONAI Label's worker thread marks the first run RUNNING a moment after submission: until then both wait
    ahead = 0 if jobs[first]["state"] == "running" else 1
    assert jobs[first]["state"] in ("queued", "running") and jobs[first]["position"] == ahead
    assert jobs[second]["state"] == "queued" and jobs[second]["position"] == ahead + 1 and jobs[second]["eta_s"] is None
    user_view = requests.get(url + "/queue/", headers=h(env, "user"), timeout=10).json()["jobs"]
    assert not [j for j in user_view if j["kind"] == "train"]  # a user sees their own jobs only
    deadline = time.time() + 300
    while time.time() < deadline and [train_jobs()[j]["state"] for j in (first, second)] != ["done", "running"]:
        time.sleep(0.2)
    jobs = train_jobs()
    assert jobs[first]["state"] == "done" and jobs[first]["finished"] > jobs[first]["started"], jobs
    measured = jobs[first]["finished"] - jobs[first]["started"]
    row = requests.get(url + f"/queue/{second}", headers=admin, timeout=10).json()
    assert row["state"] == "running" and row["position"] == 0 and row["started"] >= jobs[first]["finished"]
    assert row["eta_s"] is not None and row["eta_s"] <= measured + 1  # from the measured run, less its time so far
    deadline = time.time() + 300  # a training subprocess starts slowly on a loaded box
    while time.time() < deadline and train_jobs()[second]["state"] != "done":
        time.sleep(0.2)
    assert train_jobs()[second]["state"] == "done"


# ---------------------------------------------------------------- logs

def test_tokens_never_appear_in_the_server_log(env):
    url = env["url"]
    admin = env["tokens"]["admin"]
    requests.get(url + f"/info/?token={admin}&access_token={admin}", headers=h(env, "admin"), timeout=10)
    requests.get(url + "/info/", headers=bearer(admin + "x"), timeout=10)
    requests.post(url + "/infer/raddiagseg?image=ct1&output=json", headers=h(env, "admin"),
                  data={"params": json.dumps({"question": f"Bearer {admin}"})}, timeout=60)
    time.sleep(0.5)
    log = env["server"].log_path.read_text(errors="replace")
    assert "GET /info/" in log  # the access log is on
    for token in env["tokens"].values():
        assert token not in log


# ---------------------------------------------------------------- tokens and launcher

def test_auth_config_stores_only_hashes_and_identifies_users(tmp_path):
    config = tmp_path / "auth.json"
    token = add_user(config, "alice", "annotator")
    text = config.read_text()
    assert token not in text and hash_token(token) in text
    store = TokenStore.load(config)
    who = store.identify(token)
    assert who.name == "alice" and who.has("user") and who.has("annotator") and not who.has("admin")
    assert store.identify(token[:-1]) is None and store.identify("") is None
    again = add_user(config, "alice", "admin")  # replacing a user revokes the old token
    store = TokenStore.load(config)
    assert store.identify(token) is None and store.identify(again).role == "admin"


@pytest.mark.parametrize("content,message", [
    ("not json", "not valid JSON"),
    ('{"users": []}', "non-empty"),
    ('{"users": [{"name": "a", "role": "root", "token_sha256": "' + "0" * 64 + '"}]}', "role"),
    ('{"users": [{"name": "a", "role": "user", "token_sha256": "abc"}]}', "token_sha256"),
])
def test_malformed_auth_config_is_refused_with_a_message(tmp_path, content, message):
    config = tmp_path / "auth.json"
    config.write_text(content)
    with pytest.raises(AuthConfigError, match=message):
        TokenStore.load(config)


def test_launcher_add_user_and_refusals(tmp_path):
    config = tmp_path / "auth.json"
    made = subprocess.run([sys.executable, str(SERVE), "add-user", "--auth-config", str(config), "--name", "bob",
                           "--role", "user"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0
    token = made.stdout.strip()
    assert len(token) >= 40 and TokenStore.load(config).identify(token).name == "bob"
    missing = subprocess.run([sys.executable, str(SERVE), "--studies", str(tmp_path), "--auth-config",
                              str(tmp_path / "none.json")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    cors = subprocess.run([sys.executable, str(SERVE), "--studies", str(tmp_path), "--auth-config", str(config),
                           "--cors-origin", "*"], capture_output=True, text=True, timeout=60)
    assert cors.returncode == 2 and "--cors-origin" in cors.stderr


def test_queue_refuses_over_capacity_with_a_retry_estimate_from_recent_runs():
    """Unit check of the bounded queue: capacity counts running + waiting; Retry-After is the ETA the refused
    request would have had: the mean measured run time of its kind x the jobs ahead (and its own) / workers;
    the first run of the kind (the model load) is left out of the mean once later runs exist."""
    import asyncio

    from server.work_queue import ModelQueue, QueueFull

    async def scenario():
        queue = ModelQueue(capacity=2, per_user=2)
        for seconds in (1.5, 0.3, 0.3):  # measured runs of this kind: a slow first one, then 0.3 s
            await queue.run(queue.admit("alice", "infer", "m"), time.sleep, seconds)
        release = threading.Event()
        running = [asyncio.ensure_future(queue.run(queue.admit("alice", "infer", "m"), release.wait, 10))
                   for _ in range(2)]
        await asyncio.sleep(0.1)
        assert queue.depth == 2
        positions = sorted(p for p, _ in queue.estimates().values())
        assert queue.summary()["mean_run_s"] == {"infer/m": 0.3}
        with pytest.raises(QueueFull) as refused:
            queue.admit("bob", "infer", "m")
        release.set()
        assert await asyncio.gather(*running) == [True, True]
        job = queue.admit("bob", "infer", "m")
        assert queue.depth == 1 and await queue.run(job, lambda: "served") == "served"
        assert queue.find(job.id).state == "done" and queue.find(refused.value.job.id).state == "refused"
        queue.shutdown()
        return refused.value, positions

    refused, positions = asyncio.run(scenario())
    assert positions == [0, 1]  # one running, one waiting
    # 0.2 s left of the running job + 0.3 s for the waiting one + 0.3 s of its own -> 0.8 s -> 1 s
    # (with the first run in the mean, 0.7 s: 2 s)
    assert refused.status == 503 and refused.retry_after == 1 and "busy" in str(refused)
