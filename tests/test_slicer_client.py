"""RadDiagClient against a tiny local HTTP server: requests it sends, answers it reads, errors it explains.

The server here only mimics MONAI Label's REST surface (paths, query/form fields, multipart
answer); the real server is exercised in test_slicer_acceptance.py.
"""

import http.server
import json
import socket
import threading
import urllib.parse

import numpy as np
import pytest

from RadDiagLib import RadDiagClient, ServerError, diagnose, image_id_for, retrain, submit_correction
from RadDiagLib.labelmap import read_nrrd, write_nrrd
from RadDiagLib.multipart import parse_multipart

RESPONSE = {
    "answer": "1. Yes\n2. Liver tumour\n3. Segmentation masks:\n- liver <seg000>\n- liver tumour <seg001>",
    "detection": True, "diagnosis": "Liver tumour",
    "segments": [{"name": "liver", "role": "organ", "label_value": 1, "color": [221, 130, 101]},
                 {"name": "liver tumour", "role": "abnormality", "label_value": 2, "color": [240, 60, 60]}],
}


class FakeServer:
    """Records requests; `routes[(method, path)]` -> callable(request) -> (status, headers, body bytes)."""

    def __init__(self):
        self.requests = []
        self.routes = {}
        self.token = None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                url = urllib.parse.urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fields = {}
                if "multipart/" in (self.headers.get("Content-Type") or ""):
                    fields = parse_multipart(self.headers["Content-Type"], body)
                elif "urlencoded" in (self.headers.get("Content-Type") or ""):
                    fields = {k: (None, v.encode()) for k, v in urllib.parse.parse_qsl(body.decode())}
                request = {"method": self.command, "path": url.path, "query": dict(urllib.parse.parse_qsl(url.query)),
                           "headers": dict(self.headers), "body": body, "fields": fields}
                server.requests.append(request)
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    status, headers, out = 401, {"Content-Type": "application/json"}, b'{"detail":"Not authenticated"}'
                else:
                    route = server.routes.get((self.command, url.path))
                    status, headers, out = route(request) if route else (404, {"Content-Type": "application/json"},
                                                                         b'{"detail":"Not Found"}')
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def json(self, method, path, payload, status=200, headers=None):
        body = json.dumps(payload).encode()
        self.routes[(method, path)] = lambda r: (status, dict({"Content-Type": "application/json"}, **(headers or {})), body)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = FakeServer()
    yield s
    s.close()


def _label_file(tmp_path, values=(1, 2)):
    labels = np.zeros((4, 4, 2), np.uint8)
    for i, v in enumerate(values):
        labels[i, i, 0] = v
    path = str(tmp_path / "result.nrrd")
    write_nrrd(path, labels)
    return path


def _multipart_infer(label_path, params=RESPONSE):
    from requests_toolbelt import MultipartEncoder

    def route(request):
        encoder = MultipartEncoder(fields={"params": (None, json.dumps(params), "application/json"),
                                           "image": ("label.nrrd", open(label_path, "rb").read(), "application/octet-stream")})
        return 200, {"Content-Type": encoder.content_type}, encoder.to_string()

    return route


def test_infer_by_id_sends_question_and_reads_label(server, tmp_path):
    label = _label_file(tmp_path)
    server.routes[("POST", "/infer/raddiagseg")] = _multipart_infer(label)
    client = RadDiagClient(server.url, token="abc")
    result = client.infer("raddiagseg", image_id="ct_1", params={"question": "Q?", "slice": 3},
                          result_dir=str(tmp_path / "out"))
    request = server.requests[-1]
    assert request["query"] == {"image": "ct_1"}
    assert json.loads(request["fields"]["params"][1]) == {"question": "Q?", "slice": 3}
    assert request["headers"]["Authorization"] == "Bearer abc"
    assert result.answer == RESPONSE["answer"]
    assert result.label_path.endswith("label.nrrd")
    assert np.array_equal(read_nrrd(result.label_path)[0], read_nrrd(label)[0])


def test_infer_file_upload_variant(server, tmp_path):
    label = _label_file(tmp_path)
    server.routes[("POST", "/infer/raddiagseg")] = _multipart_infer(label)
    image = tmp_path / "xray.png"
    image.write_bytes(b"\x89PNG fake")
    RadDiagClient(server.url).infer("raddiagseg", image_path=str(image))
    request = server.requests[-1]
    assert request["fields"]["file"] == ("xray.png", b"\x89PNG fake")
    assert "Authorization" not in request["headers"]


def test_diagnose_uploads_once_then_reuses_the_image(server, tmp_path):
    label = _label_file(tmp_path, values=(1,))  # tumour returned in JSON but without voxels
    server.routes[("POST", "/infer/raddiagseg")] = _multipart_infer(label)
    stored = {}

    def head(request):
        ok = request["query"].get("image") in stored
        return (200 if ok else 404), {"Content-Type": "application/json"}, b"{}"

    def put(request):
        stored[request["query"]["image"]] = request["fields"]["file"][1]
        return 200, {"Content-Type": "application/json"}, json.dumps({"image": request["query"]["image"]}).encode()

    server.routes[("HEAD", "/datastore/image")] = head
    server.routes[("PUT", "/datastore/image")] = put
    volume = tmp_path / "ct.nrrd"
    write_nrrd(str(volume), np.zeros((4, 4, 2), np.int16))
    image_id = image_id_for("CT chest #1", str(volume))
    assert image_id.startswith("CT_chest_1_") and image_id == image_id_for("CT chest #1", str(volume))
    client = RadDiagClient(server.url)
    first = diagnose(client, "raddiagseg", str(volume), image_id, "Q", slice_index=1, result_dir=str(tmp_path))
    second = diagnose(client, "raddiagseg", str(volume), image_id, "Q", slice_index=1, result_dir=str(tmp_path))
    puts = [r for r in server.requests if r["method"] == "PUT"]
    assert len(puts) == 1  # the second question reuses the stored image
    assert [s.name for s in first.specs] == ["liver", "liver tumour"]
    assert [s.name for s in first.empty] == ["liver tumour"] and first.present == {1}
    assert second.detection is True and second.diagnosis == "Liver tumour"


def test_submit_correction_sends_label_and_info(server, tmp_path):
    server.json("PUT", "/datastore/label", {"image": "ct_1", "label": "ct_1"})
    label = _label_file(tmp_path)
    from RadDiagLib import segment_specs
    info, _ = submit_correction(RadDiagClient(server.url), "ct_1", label, segment_specs(RESPONSE), True, "Liver cyst",
                                slice_index=2)
    request = server.requests[-1]
    assert request["query"] == {"image": "ct_1", "tag": "final"}
    assert request["fields"]["label"][1] == open(label, "rb").read()
    sent = json.loads(request["fields"]["params"][1])
    assert sent == info and sent["diagnosis"] == "Liver cyst" and sent["label_names"] == {"liver": 1, "liver tumour": 2}


def test_retrain_follows_progress_to_live_model(server):
    polls = {"n": 0}
    server.json("POST", "/train/raddiagseg", {"id": "t2", "status": "RUNNING"})

    def status(request):
        polls["n"] += 1
        state = "RUNNING" if polls["n"] < 3 else "DONE"
        task_id = "t1" if polls["n"] == 1 else "t2"  # first poll still shows the previous task
        return 200, {"Content-Type": "application/json"}, json.dumps({"id": task_id, "status": state}).encode()

    def info(request):
        done = polls["n"] >= 3
        stats = {"step": 10 if done else 4, "total_steps": 10, "loss": 0.3, "published": True if done else None}
        return 200, {"Content-Type": "application/json"}, json.dumps({"train_stats": {"raddiagseg": stats}}).encode()

    server.routes[("GET", "/train/")] = status
    server.routes[("GET", "/info/")] = info
    seen = []

    class Ctx:
        def progress(self, fraction, message):
            seen.append((fraction, message))

        def wait(self, s):
            pass

    final = retrain(RadDiagClient(server.url), "raddiagseg", context=Ctx(), poll_s=0)
    assert final.state == "done" and final.published
    assert seen[0][1].startswith("Training") and "new model is live" in seen[-1][1]
    assert any(f == 0.4 for f, _ in seen)


def test_token_login_and_reuse(server):
    server.json("POST", "/auth/token", {"access_token": "tok123", "token_type": "bearer"})
    server.json("GET", "/info/", {"models": {"raddiagseg": {}, "other": {}}})
    client = RadDiagClient(server.url)
    client.login("alice", "pw")
    assert urllib.parse.parse_qs(server.requests[-1]["body"].decode())["username"] == ["alice"]
    server.token = "tok123"
    assert client.models() == ["other", "raddiagseg"]
    assert client.info() and server.requests[-1]["headers"]["Authorization"] == "Bearer tok123"


@pytest.mark.parametrize("status,headers,needle", [
    (401, {}, "token missing or expired"),
    (403, {}, "not allowed"),
    (413, {}, "too large"),
    (503, {"Retry-After": "30"}, "try again in 30 s"),
    (500, {}, "see the server log"),
])
def test_http_errors_say_what_to_do(server, status, headers, needle):
    server.json("GET", "/info/", {"detail": "boom detail"}, status=status, headers=headers)
    with pytest.raises(ServerError) as err:
        RadDiagClient(server.url).info()
    assert needle in str(err.value) and "boom detail" in str(err.value)
    assert err.value.status == status


def test_missing_token_against_auth_server(server):
    server.token = "secret"
    with pytest.raises(ServerError, match="token missing or expired"):
        RadDiagClient(server.url).info()
    with pytest.raises(ServerError, match="token missing or expired"):
        RadDiagClient(server.url, token="wrong").info()


def test_unreachable_server_and_bad_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(ServerError, match="is the server running"):
        RadDiagClient(f"127.0.0.1:{port}", timeout=(1, 1)).info()
    with pytest.raises(ServerError, match="server URL"):
        RadDiagClient("  ")
    with pytest.raises(ServerError, match="http://host:port"):
        RadDiagClient("ftp://x")


def test_slow_server_times_out_with_advice(server):
    import time
    server.routes[("GET", "/info/")] = lambda r: (time.sleep(1.5), (200, {}, b"{}"))[1]
    with pytest.raises(ServerError, match="did not answer within 1 s"):
        RadDiagClient(server.url, timeout=(1, 1)).info()


def test_garbled_infer_response(server):
    server.routes[("POST", "/infer/raddiagseg")] = lambda r: (200, {"Content-Type": "text/html"}, b"<html>proxy</html>")
    with pytest.raises(ServerError, match="could not be read"):
        RadDiagClient(server.url).infer("raddiagseg", image_id="x")
