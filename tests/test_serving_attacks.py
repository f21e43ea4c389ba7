"""The holes an attack run found in serve.py (issue 18), each reproduced against a real serve.py
process: path-suffix bypass of the upload checks, the DICOMweb proxy escaping its prefix with the
client's token, gzip bombs, header files that point at server files."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import nibabel
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from serving_helpers import SERVE, bearer, make_users, start_serve, volume, write_image, write_stub_app

MAX_DECODED_MB = 64


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("attacks")
    app = write_stub_app(base / "app")
    studies = base / "studies"
    studies.mkdir()
    write_image(studies / "ct1.nii.gz")
    write_image(studies / "ct2.nii.gz", volume(seed=2))
    auth = base / "auth.json"
    tokens = make_users(auth)
    tmp = base / "tmp"  # the server's temp folder, to see what it leaves behind
    tmp.mkdir()
    server = start_serve(app, studies, auth, tokens["user"], env={"TMPDIR": str(tmp)},
                         extra=["--max-upload-mb", "8", "--max-decoded-mb", str(MAX_DECODED_MB)])
    yield {"url": server.url, "tokens": tokens, "studies": studies, "base": base, "server": server, "tmp": tmp}
    server.stop()


def h(env, role):
    return bearer(env["tokens"][role])


def _detail(reply):
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.text[:200]
    detail = reply.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 10
    return detail


# ---------------------------------------------------------------- 1. path-suffix bypass

@pytest.mark.parametrize("path", [
    "/datastore/image%0A", "/datastore/image%0a/", "/datastore/image%00", "/datastore/image;x", "/datastore//image",
    "/datastore/image/%2E%2E/image", "/datastore%2Fimage", "/datastore/image%20",
])
def test_a_path_suffix_never_reaches_the_stock_upload_handler(env, path):
    original = (env["studies"] / "ct1.nii.gz").read_bytes()
    reply = requests.put(env["url"] + path + "?image=ct1", headers=h(env, "annotator"),
                         files={"file": ("ct1.nii.gz", b"not an image, just text")}, timeout=30)
    assert reply.status_code == 400, (path, reply.status_code, reply.text)
    assert "path" in _detail(reply)
    label = np.random.default_rng(0).bytes(50_000)
    reply = requests.put(env["url"] + path.replace("image", "label") + "?image=ct1", headers=h(env, "annotator"),
                         files={"label": ("ct1.nii.gz", label)}, timeout=30)
    assert reply.status_code in (400, 404), (path, reply.status_code, reply.text)
    assert (env["studies"] / "ct1.nii.gz").read_bytes() == original
    assert not (env["studies"] / "labels" / "final" / "ct1.nii.gz").exists()


@pytest.mark.parametrize("method,path", [
    ("PUT", "/session/"), ("POST", "/infer/wsi/raddiagseg"), ("GET", "/auth/realm"), ("POST", "/auth/token/valid"),
    ("GET", "/no/such/thing"),
    ("POST", "/proxy/dicom/studies"),
])
def test_anything_not_explicitly_allowed_is_refused(env, method, path):
    reply = requests.request(method, env["url"] + path, headers=h(env, "admin"), timeout=30)
    assert reply.status_code == 404, (method, path, reply.text)
    assert "not served" in _detail(reply)


# ---------------------------------------------------------------- 3. gzip bomb

def _nifti_bomb(path: Path, shape=(256, 256, 512), dtype=np.float64) -> Path:
    """A .nii.gz of zeros whose header is honest: it really inflates to prod(shape) x 8 bytes."""
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_data_offset(352)
    buf = io.BytesIO()
    header.write_to(buf)
    zeros = bytes(16 * 1024 * 1024)
    with gzip.open(path, "wb", compresslevel=6) as f:
        f.write(buf.getvalue().ljust(352, b"\0"))
        for _ in range(int(np.prod(shape)) * np.dtype(dtype).itemsize // len(zeros)):
            f.write(zeros)
    return path


def _peak_rss_mb(server) -> float:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_gzip_bomb_is_refused_from_its_header_without_inflating(env):
    bomb = _nifti_bomb(env["base"] / "bomb.nii.gz")
    assert bomb.stat().st_size < 2 * 1024 * 1024
    before = _peak_rss_mb(env["server"])
    url = env["url"]

    def upload(_):
        with open(bomb, "rb") as f:
            return requests.put(url + "/datastore/image?image=bomb", headers=h(env, "annotator"),
                                files={"file": ("bomb.nii.gz", f)}, timeout=120)

    with ThreadPoolExecutor(3) as pool:
        replies = pool.map(upload, range(3))
        slowest = 0.0
        for _ in range(5):
            start = time.perf_counter()
            assert requests.get(url + "/info/", headers=h(env, "user"), timeout=30).status_code == 200
            slowest = max(slowest, time.perf_counter() - start)
        replies = list(replies)
    for reply in replies:
        assert reply.status_code == 413, reply.text
        assert "decompress" in _detail(reply)
    assert slowest < 2.0
    assert _peak_rss_mb(env["server"]) - before < MAX_DECODED_MB, "the server inflated the bomb"
    assert not (env["studies"] / "bomb.nii.gz").exists()


def test_pixel_data_beyond_what_the_header_declares_is_refused(env):
    """A small header with gigabytes of zeros behind it: inflation stops at the declared size."""
    image = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16))
    plain = env["base"] / "small.nii"
    sitk.WriteImage(image, str(plain))
    padded = env["base"] / "padded.nii.gz"
    with gzip.open(padded, "wb") as f:
        f.write(plain.read_bytes())
        f.write(bytes(64 * 1024 * 1024))
    with open(padded, "rb") as f:
        reply = requests.post(env["url"] + "/infer/raddiagseg?output=json", headers=h(env, "user"),
                              files={"file": ("padded.nii.gz", f)}, timeout=60)
    assert reply.status_code == 400 and "more data" in _detail(reply)


def _nifti_offset_bomb(path: Path, offset: int) -> Path:
    """A .nii.gz of 8x8x8 voxels whose vox_offset puts `offset` bytes of gzipped zeros before them."""
    header = nibabel.Nifti1Header()
    header.set_data_shape((8, 8, 8))
    header.set_data_dtype(np.int16)
    header.set_data_offset(offset)
    buf = io.BytesIO()
    header.write_to(buf)
    zeros = bytes(16 * 1024 * 1024)
    with gzip.open(path, "wb", compresslevel=6) as f:
        f.write(buf.getvalue())
        left = offset - len(buf.getvalue())
        while left > 0:
            f.write(zeros[: min(left, len(zeros))])
            left -= len(zeros)
        f.write(bytes(8 * 8 * 8 * 2))
    return path


def _nrrd_skipping(skip: int) -> bytes:
    """A gzip NRRD of 8x8x8 voxels with `byte skip: skip` (the skipped bytes are gzipped zeros)."""
    head = f"NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 8\nendian: little\nencoding: gzip\nbyte skip: {skip}\n\n"
    out = io.BytesIO(head.encode())
    out.seek(0, io.SEEK_END)
    with gzip.GzipFile(fileobj=out, mode="wb") as f:
        for start in range(0, skip + 8 * 8 * 8 * 2, 16 * 1024 * 1024):
            f.write(bytes(min(16 * 1024 * 1024, skip + 8 * 8 * 8 * 2 - start)))
    return out.getvalue()


def test_a_nifti_whose_offset_hides_a_bomb_is_refused_from_its_header(env):
    """A few voxels after a vox_offset of 256 MB of gzipped zeros (0.25 MB uploaded): the check inflated the
    offset in one read and accepted the file."""
    bomb = _nifti_offset_bomb(env["base"] / "offset-bomb.nii.gz", 4 * MAX_DECODED_MB * 1024 * 1024)
    before = _peak_rss_mb(env["server"])
    reply = requests.put(env["url"] + "/datastore/image?image=offsetbomb", headers=h(env, "annotator"),
                         files={"file": ("offsetbomb.nii.gz", bomb.read_bytes())}, timeout=120)
    assert reply.status_code == 413 and "decompress" in _detail(reply), reply.text
    assert _peak_rss_mb(env["server"]) - before < MAX_DECODED_MB, "the server inflated the offset"
    assert not (env["studies"] / "offsetbomb.nii.gz").exists()


def test_a_nrrd_that_skips_bytes_through_gzip_is_refused_from_its_header(env):
    """ITK skips 'byte skip' through a gzip stream byte by byte: 512 MB held the one check thread for > 5 minutes."""
    start = time.perf_counter()
    reply = requests.put(env["url"] + "/datastore/image?image=skipper", headers=h(env, "annotator"),
                         files={"file": ("skipper.nrrd", _nrrd_skipping(1024 * 1024))}, timeout=120)
    assert reply.status_code == 400 and "skip" in _detail(reply), reply.text
    assert time.perf_counter() - start < 10
    assert not (env["studies"] / "skipper.nrrd").exists()


# ---------------------------------------------------------------- 4. headers that point at server files

def _mhd(data_file):
    return (f"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
            f"ElementDataFile = {data_file}\n").encode()


def _nhdr(data_file):
    return f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: {data_file}\n\n".encode()


@pytest.mark.parametrize("name,make", [("x.mhd", _mhd), ("x.mha", _mhd), ("x.nhdr", _nhdr), ("x.nrrd", _nhdr)])
def test_headers_naming_a_data_file_are_refused_alike_whether_it_exists_or_not(env, name, make):
    answers = []
    for target in ("/etc/passwd", "/etc/no-such-file-here"):
        for method, path, field in (("POST", "/infer/raddiagseg?output=json", "file"),
                                    ("PUT", "/datastore/image?image=probe", "file")):
            reply = requests.request(method, env["url"] + path, headers=h(env, "annotator"),
                                     files={field: (name, make(target))}, timeout=30)
            assert reply.status_code in (400, 415), (name, target, reply.text)
            answers.append((target, method, reply.status_code, _detail(reply)))
    first, second = answers[:2], answers[2:]
    assert [a[1:] for a in first] == [a[1:] for a in second], "the answer tells whether a server file exists"
    assert not (env["studies"] / "probe.nii.gz").exists()


# ---------------------------------------------------------------- 2. DICOMweb proxy

class _Upstream(BaseHTTPRequestHandler):
    """Records every request; answers DICOMweb searches with an empty list."""

    seen: ClassVar[list] = []

    def _answer(self):
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        type(self).seen.append((self.command, self.path, dict(self.headers)))
        body = b"[]"
        self.send_response(200)
        self.send_header("content-type", "application/dicom+json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def dicomweb(tmp_path_factory):
    base = tmp_path_factory.mktemp("proxy")
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    studies = f"http://127.0.0.1:{upstream.server_address[1]}/dicom-web"
    auth = base / "auth.json"
    tokens = make_users(auth)
    server = start_serve(write_stub_app(base / "app"), studies, auth, tokens["user"],
                         env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(base / "cache"),
                              "MONAI_LABEL_DATASTORE_USERNAME": "raddiag", "MONAI_LABEL_DATASTORE_PASSWORD": "s3rver"})
    yield {"url": server.url, "tokens": tokens, "server": server}
    server.stop()
    upstream.shutdown()


@pytest.mark.parametrize("method,path", [
    ("GET", "/proxy/dicom/wado/..%2F..%2Ftools%2Fshutdown"),
    ("GET", "/proxy/dicom/wado/../../tools/shutdown"),
    ("GET", "/proxy/dicom/qido/studies/..%2F..%2F..%2Finstances"),
    ("GET", "/proxy/dicom/qido/studies/%2E%2E/%2E%2E/%2E%2E/instances"),
    ("GET", "/proxy/dicom/wado/tools/execute-script"),
    ("POST", "/proxy/dicom/wado/..%2F..%2Ftools%2Fexecute-script"),
    ("POST", "/proxy/dicom/stow/studies"),  # a read-only user may not store
    ("POST", "/proxy/dicom/..%2Ftools%2Fshutdown"),
    ("GET", "/proxy/dicom/tools/shutdown"),
])
def test_the_proxy_never_leaves_the_dicomweb_prefix_or_the_role(dicomweb, method, path):
    _Upstream.seen.clear()
    reply = requests.request(method, dicomweb["url"] + path, headers=h(dicomweb, "user"), data=b"os.exit()",
                             timeout=30)
    assert 400 <= reply.status_code < 500, (path, reply.status_code, reply.text)
    _detail(reply)
    assert not _Upstream.seen, _Upstream.seen


def test_the_proxy_uses_the_servers_credentials_never_the_clients(dicomweb):
    import base64

    _Upstream.seen.clear()
    reply = requests.get(dicomweb["url"] + "/proxy/dicom/qido/studies?PatientID=P1", timeout=30,
                         headers={**h(dicomweb, "user"), "Accept": "application/dicom+json", "X-Evil": "1"})
    assert reply.status_code == 200 and reply.json() == []
    stored = requests.post(dicomweb["url"] + "/proxy/dicom/stow/studies", headers=h(dicomweb, "annotator"),
                           data=b"--x--", timeout=30)
    assert stored.status_code == 200
    (m1, p1, h1), (m2, p2, h2) = _Upstream.seen
    assert (m1, p1) == ("GET", "/dicom-web/studies?PatientID=P1") and (m2, p2) == ("POST", "/dicom-web/studies")
    server_auth = "Basic " + base64.b64encode(b"raddiag:s3rver").decode()
    for headers in (h1, h2):
        assert headers.get("Authorization") == server_auth
        assert not any(t in json.dumps(headers) for t in dicomweb["tokens"].values())
        assert "X-Evil" not in headers


@pytest.mark.parametrize("method,path", [
    ("GET", "/datastore/image?image=1.2.3"), ("GET", "/datastore/label?label=1.2.3&tag=final"),
    ("HEAD", "/datastore/label?label=1.2.3&tag=final"),
])
def test_downloading_a_series_the_pacs_does_not_hold_is_a_404(dicomweb, method, path):
    """MONAI Label's DICOMweb datastore answered 500 (IndexError looking the series up)."""
    reply = requests.request(method, dicomweb["url"] + path, headers=h(dicomweb, "user"), timeout=30)
    assert reply.status_code == 404, (path, reply.status_code, reply.text[:200])
    if method == "GET":
        assert "1.2.3" in _detail(reply)


def test_the_proxy_in_local_mode_is_a_404_with_a_message(env):
    reply = requests.get(env["url"] + "/proxy/dicom/qido/studies", headers=h(env, "user"), timeout=30)
    assert reply.status_code == 404 and "DICOMweb" in _detail(reply)


# ---------------------------------------------------------------- 11. inputs that answered 500

def _raw_get(env, path, role="user"):
    """A request with the path exactly as given (requests and urllib3 drop '..' segments)."""
    import http.client

    host, port = env["url"].removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers=h(env, role))
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        connection.close()


CRASHERS = [
    ("question with a lone surrogate", "POST", "/infer/raddiagseg?image=ct1&output=json",
     {"params": '{"question": "\\udfff"}'}, "surrogate"),
    ("params nested 20,000 levels", "POST", "/infer/raddiagseg?image=ct1&output=json",
     {"params": '{"question": ' + "[" * 20000 + "]" * 20000 + "}"}, "nested"),
    ("image info not JSON", "PUT", "/datastore/image/info?image=ct1", {"info": "{not json"}, "JSON"),
    ("image info of an unknown image", "PUT", "/datastore/image/info?image=nope", {"info": "{}"}, "nope"),
    ("label info of an unknown label", "PUT", "/datastore/label/info?label=ct1&tag=final", {"info": "{}"}, "ct1"),
    ("legacy label info of an unknown label", "PUT", "/datastore/updatelabelinfo?label=ct1&tag=nope",
     {"params": "{}"}, "nope"),
    ("dataset without labels", "GET", "/datastore/dataset", None, "label"),
    ("delete an unknown image", "DELETE", "/datastore/image?id=nope", None, "nope"),
    ("delete an unknown label", "DELETE", "/datastore/label?id=ct1&tag=nope", None, "nope"),
    ("dataset limit_cases not a number", "GET", "/datastore/dataset?limit_cases=abc", None, "limit_cases"),
]


@pytest.mark.parametrize("name,method,path,data,says", CRASHERS, ids=[c[0] for c in CRASHERS])
def test_inputs_that_answered_500_are_4xx_with_a_message(env, name, method, path, data, says):
    reply = requests.request(method, env["url"] + path, headers=h(env, "admin"), data=data, timeout=60)
    assert 400 <= reply.status_code < 500, (name, reply.status_code, reply.text[:300])
    assert says in _detail(reply), reply.text[:300]
    assert requests.get(env["url"] + "/info/", headers=h(env, "user"), timeout=10).status_code == 200


JSON_BODIES = [
    ("lone surrogate", b'{"epochs": "\\udfff"}', "surrogate"),
    ("nested 20,000 levels", b'{"x": ' + b"[" * 20000 + b"]" * 20000 + b"}", "nested"),
    ("not UTF-8", b'{"x": "\xed\xbf\xbf"}', "UTF-8"),
    ("a list", b"[1, 2]", "object"),
]


@pytest.mark.parametrize("role,path", [("admin", "/train/raddiagseg"), ("annotator", "/scoring/x"),
                                       ("user", "/activelearning/first")])
@pytest.mark.parametrize("name,body,says", JSON_BODIES, ids=[b[0] for b in JSON_BODIES])
def test_json_bodies_of_every_route_are_checked_like_params(env, role, path, name, body, says):
    """MONAI Label's train and scoring routes started the task, then answered 500 encoding a lone surrogate."""
    reply = requests.post(env["url"] + path, headers={**h(env, role), "Content-Type": "application/json"}, data=body,
                          timeout=60)
    assert reply.status_code == 400, (name, path, reply.status_code, reply.text[:300])
    assert says in _detail(reply)
    assert requests.get(env["url"] + "/info/", headers=h(env, "user"), timeout=10).status_code == 200


def test_stop_button_with_the_stock_clients_stale_content_length_is_answered(env):
    """MONAI Label's client keeps the Content-Length of its last request with a body and sends it with its
    Stop button's DELETE /train/ (no body): serve.py waited for that body and never answered."""
    import http.client

    host, port = env["url"].split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("DELETE", "/train/", headers={**h(env, "admin"), "content-type": "application/json",
                                                      "content-length": "17"})
    reply = connection.getresponse()
    assert reply.status == 200, reply.read()[:300]


def test_gpu_info_is_nvidia_smi_or_a_404_saying_there_is_none(env):
    import shutil

    reply = requests.get(env["url"] + "/logs/gpu", headers=h(env, "admin"), timeout=60)
    if shutil.which("nvidia-smi"):  # the server runs on this machine
        assert reply.status_code == 200 and "NVIDIA" in reply.text
    else:
        assert reply.status_code == 404 and "nvidia-smi" in _detail(reply)


def test_image_check_with_an_unknown_checksum_algorithm_is_a_400_and_a_right_one_matches(env):
    url, headers = env["url"] + "/datastore/image", h(env, "user")
    digest = hashlib.sha256((env["studies"] / "ct1.nii.gz").read_bytes()).hexdigest()
    assert requests.head(url, params={"image": "ct1", "check_sum": "NOPE:abc"}, headers=headers).status_code == 400
    assert requests.head(url, params={"image": "ct1", "check_sum": f"SHA256:{digest}"}, headers=headers).status_code == 200
    assert requests.head(url, params={"image": "ct1", "check_sum": "SHA256:" + "0" * 64}, headers=headers).status_code == 404
    assert requests.head(url, params={"image": "nope"}, headers=headers).status_code == 404


@pytest.mark.parametrize("path", ["/ohif/..", "/ohif/../datastore/", "/ohif/%2e%2e/logs/"])
def test_dot_segments_under_ohif_are_a_400(env, path):
    status, body = _raw_get(env, path)
    assert status == 400 and "'..'" in body["detail"], (status, body)


@pytest.mark.parametrize("method,op", [("GET", "wado"), ("GET", "qido"), ("POST", "stow")])
def test_every_proxy_route_in_local_mode_is_a_404_with_a_message(env, method, op):
    reply = requests.request(method, f"{env['url']}/proxy/dicom/{op}/studies", headers=h(env, "annotator"), timeout=30)
    assert reply.status_code == 404 and "DICOMweb" in _detail(reply)


# ---------------------------------------------------------------- 9 and 12: nothing left behind, bounded, no paths

def _save_label(env, image="ct2", info=None):
    label = sitk.GetImageFromArray((sitk.GetArrayFromImage(volume(seed=2)) > 300).astype(np.uint8))
    label.SetSpacing((0.8, 0.8, 2.5))
    path = env["base"] / f"{image}-label.nii.gz"
    sitk.WriteImage(label, str(path))
    reply = requests.put(env["url"] + f"/datastore/label?image={image}", headers=h(env, "annotator"),
                         data={"params": json.dumps(info or {"answer": "1. No"})},
                         files={"label": ("label.nii.gz", path.read_bytes())}, timeout=60)
    assert reply.status_code == 200, reply.text
    return path


def test_dataset_downloads_leave_nothing_in_the_temp_folder(env):
    import zipfile

    _save_label(env)
    before = sorted(p.name for p in env["tmp"].iterdir())
    for _ in range(3):
        reply = requests.get(env["url"] + "/datastore/dataset", headers=h(env, "annotator"), timeout=60)
        assert reply.status_code == 200, reply.text[:300]
        names = zipfile.ZipFile(io.BytesIO(reply.content)).namelist()
        assert {"image/ct2.nii.gz", "label/ct2.nii.gz", "metadata.json"} <= set(names)
    with requests.get(env["url"] + "/datastore/dataset", headers=h(env, "annotator"), stream=True, timeout=60) as r:
        r.raw.read(10)  # a client that hangs up after the first bytes
    time.sleep(0.5)
    assert sorted(p.name for p in env["tmp"].iterdir()) == before


def test_uploads_of_a_killed_server_are_removed_at_the_next_start_not_those_of_a_running_one(tmp_path):
    """kill -9 during label saves left their upload temp files in the temp folder for good."""
    from server.uploads import UPLOAD_PREFIX, remove_orphaned_uploads

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = tmp_path / f"{UPLOAD_PREFIX}{gone.pid}-abc.nii.gz"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a server still uploading
    running = tmp_path / f"{UPLOAD_PREFIX}{alive.pid}-def.nii.gz"
    mine = tmp_path / f"{UPLOAD_PREFIX}{os.getpid()}-ghi.nii.gz"
    other = tmp_path / "raddiag-upload-notes.txt"
    try:
        for path in (orphan, running, mine, other):
            path.write_bytes(b"x")
        assert remove_orphaned_uploads(str(tmp_path)) == [str(orphan)]
    finally:
        alive.kill()
        alive.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, mine.name, other.name])


def test_label_info_updates_follow_the_training_rules(env):
    _save_label(env)
    url = env["url"] + "/datastore/label/info?label=ct2&tag=final"
    bad = requests.put(url, headers=h(env, "annotator"), data={"info": '{"question": 12345}'}, timeout=30)
    assert bad.status_code == 400 and "training" in _detail(bad)
    good = requests.put(url, headers=h(env, "annotator"), data={"info": '{"answer": "2. Yes"}'}, timeout=30)
    assert good.status_code == 200, good.text
    info = requests.get(env["url"] + "/datastore/label/info?label=ct2&tag=final", headers=h(env, "user")).json()
    assert info["answer"] == "2. Yes" and info["user"] == "annotator1" and "question" not in info


def test_image_info_is_bounded_per_image_and_cannot_grow_past_it(env):
    url, headers = env["url"] + "/datastore/image/info?image=ct1", h(env, "annotator")
    index = env["studies"] / "datastore_v2.json"
    too_big = requests.put(url, headers=headers, data={"info": json.dumps({"notes": "x" * 70_000})}, timeout=30)
    assert too_big.status_code == 413, too_big.text
    statuses = [requests.put(url, headers=headers, data={"info": json.dumps({f"k{i}": "x" * 30_000})},
                             timeout=30).status_code for i in range(4)]
    assert statuses[0] == 200 and 413 in statuses[1:], statuses
    info = requests.get(url, headers=h(env, "user"), timeout=30).json()
    assert len(json.dumps(info)) <= 64 * 1024
    assert index.stat().st_size < 200 * 1024


def test_no_server_path_in_image_info_the_training_list_or_active_learning(env):
    _save_label(env)
    server_dir = str(env["base"])
    info = requests.get(env["url"] + "/datastore/image/info?image=ct1", headers=h(env, "user"), timeout=30)
    assert info.status_code == 200 and info.json()["name"] == "ct1.nii.gz"
    train = requests.get(env["url"] + "/datastore/?output=train", headers=h(env, "user"), timeout=30)
    assert {"image": "ct2.nii.gz", "label": "labels/final/ct2.nii.gz"} in train.json()
    sample = requests.post(env["url"] + "/activelearning/first", headers=h(env, "user"), timeout=60)
    assert sample.status_code == 200 and sample.json()["path"] == sample.json()["id"] + ".nii.gz", sample.text
    for reply in (info, train, sample, requests.post(env["url"] + "/infer/raddiagseg?image=ct1&output=json",
                                                     headers=h(env, "user"), timeout=60)):
        assert reply.status_code == 200 and server_dir not in reply.text, reply.text[:300]


# ---------------------------------------------------------------- 7. revocation without a restart

def _cli(env, *args):
    done = subprocess.run([sys.executable, str(SERVE), *args, "--auth-config", str(env["base"] / "auth.json")],
                          capture_output=True, text=True, timeout=60, cwd=SERVE.parent)
    return done.returncode, done.stdout.strip(), done.stderr.strip()


def _status_within(env, token, expected, seconds=5.0):
    """The status /info/ gives ``token`` once it is ``expected`` (polled), and how long that took."""
    start = time.perf_counter()
    while True:
        status = requests.get(env["url"] + "/info/", headers=bearer(token), timeout=10).status_code
        if status == expected or time.perf_counter() - start > seconds:
            return status, time.perf_counter() - start
        time.sleep(0.2)


def test_replacing_and_removing_a_user_take_effect_on_the_running_server(env):
    code, first, _ = _cli(env, "add-user", "--name", "carol", "--role", "annotator")
    assert code == 0
    assert _status_within(env, first, 200)[0] == 200  # a new user needs no restart either
    code, second, _ = _cli(env, "add-user", "--name", "carol", "--role", "user")
    assert code == 0 and second != first
    status, waited = _status_within(env, first, 401)
    assert status == 401 and waited < 5, "the replaced token still works"
    assert _status_within(env, second, 200)[0] == 200
    code, out, _ = _cli(env, "remove-user", "--name", "carol")
    assert code == 0 and out == ""
    assert _status_within(env, second, 401)[0] == 401
    assert _status_within(env, env["tokens"]["user"], 200)[0] == 200  # the others keep working
    code, _, err = _cli(env, "remove-user", "--name", "carol")
    assert code == 2 and "no user 'carol'" in err and len(err.splitlines()) == 1


def test_an_auth_config_broken_by_hand_refuses_every_token_until_fixed(env):
    auth = env["base"] / "auth.json"
    good = auth.read_text()
    try:
        auth.write_text(good[: len(good) // 2])  # an editor saved half a file
        status, _ = _status_within(env, env["tokens"]["admin"], 503)
        reply = requests.get(env["url"] + "/info/", headers=h(env, "admin"), timeout=10)
        assert status == 503 and "auth config" in _detail(reply)
    finally:
        auth.write_text(good)
    assert _status_within(env, env["tokens"]["admin"], 200)[0] == 200


# ---------------------------------------------------------------- 12. labels off the image's grid or with unnamed values

def _label_upload(env, image, array, spacing=(0.8, 0.8, 2.5), origin=(0.0, 0.0, 0.0), info=None):
    label = sitk.GetImageFromArray(array.astype(np.uint8))
    label.SetSpacing(spacing)
    label.SetOrigin(origin)
    path = env["base"] / "grid-label.nii.gz"
    sitk.WriteImage(label, str(path))
    return requests.put(env["url"] + f"/datastore/label?image={image}&tag=grid", headers=h(env, "annotator"),
                        data={"params": json.dumps(info or {})},
                        files={"label": ("label.nii.gz", path.read_bytes())}, timeout=60)


@pytest.mark.parametrize("spacing,origin,says", [
    ((1.0, 1.0, 2.5), (0.0, 0.0, 0.0), "spacing"),
    ((0.8, 0.8, 2.5), (0.0, 12.0, 0.0), "origin"),
])
def test_a_label_of_the_right_size_on_another_grid_is_refused(env, spacing, origin, says):
    reply = _label_upload(env, "ct1", np.ones((6, 24, 20)), spacing, origin)
    assert reply.status_code == 400 and says in _detail(reply)
    assert not (env["studies"] / "labels" / "grid" / "ct1.nii.gz").exists()


def test_label_values_that_no_segment_names_are_refused(env):
    array = np.zeros((6, 24, 20))
    array[:, :8] = 1
    array[:, 12:] = 2
    named_one = {"label_info": [{"name": "liver", "idx": 1}]}
    reply = _label_upload(env, "ct1", array, info=named_one)
    assert reply.status_code == 400 and "[2]" in _detail(reply), reply.text
    both = {"label_info": [{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 2}]}
    assert _label_upload(env, "ct1", array, info=both).status_code == 200


TWO_VALUES = np.zeros((6, 24, 20))
TWO_VALUES[:, :8] = 1
TWO_VALUES[:, 12:] = 2
BOTH_NAMED = {"label_info": [{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 2}]}
INFO_ROUTES = [("/datastore/label/info?label=ct2&tag=rules", "info"), ("/datastore/updatelabelinfo?label=ct2&tag=rules",
                                                                        "params")]


def _save_rules_label(env, info):
    label = sitk.GetImageFromArray(TWO_VALUES.astype(np.uint8))
    label.SetSpacing((0.8, 0.8, 2.5))
    path = env["base"] / "rules-label.nii.gz"
    sitk.WriteImage(label, str(path))
    return requests.put(env["url"] + "/datastore/label?image=ct2&tag=rules", headers=h(env, "annotator"),
                        data={"params": json.dumps(info)}, files={"label": ("label.nii.gz", path.read_bytes())},
                        timeout=60)


@pytest.mark.parametrize("info,says", [
    ({"question": 12345, **BOTH_NAMED}, "question"),  # item 8's attack on the save route
    ({"slice": 6, **BOTH_NAMED}, "slice 6 is outside"),  # ct2 has 6 slices: training skipped such a label
])
def test_label_info_training_cannot_use_is_refused_when_the_label_is_saved(env, info, says):
    saved = env["studies"] / "labels" / "rules" / "ct2.nii.gz"
    before = saved.read_bytes() if saved.exists() else None
    reply = _save_rules_label(env, info)
    assert reply.status_code == 400 and says in _detail(reply) and "training" in _detail(reply), reply.text
    assert (saved.read_bytes() if saved.exists() else None) == before


@pytest.mark.parametrize("route,field", INFO_ROUTES, ids=["label/info", "updatelabelinfo"])
@pytest.mark.parametrize("update,says", [
    ({"question": 12345}, "question"),
    ({"slice": 99}, "slice 99 is outside"),
    ({"label_info": [{"name": "liver", "idx": 1}]}, "[2]"),  # would leave value 2 unnamed, as a save may not
    ({"segments": [{"name": "liver", "label_value": 1}]}, "[2]"),
])
def test_label_info_updates_follow_the_rules_of_a_save_on_both_routes(env, route, field, update, says):
    assert _save_rules_label(env, {**BOTH_NAMED, "slice": 5}).status_code == 200
    reply = requests.put(env["url"] + route, headers=h(env, "annotator"), data={field: json.dumps(update)}, timeout=30)
    assert reply.status_code == 400 and says in _detail(reply), reply.text
    info = requests.get(env["url"] + "/datastore/label/info?label=ct2&tag=rules", headers=h(env, "user")).json()
    assert info["label_info"] == BOTH_NAMED["label_info"] and info["slice"] == 5 and "question" not in info


def test_a_segment_name_training_does_not_know_still_names_its_value(env):
    """lib/label_info: such a segment is left out of training, the rest of the label used (not a refusal)."""
    reply = _save_rules_label(env, {"label_info": [{"name": "liver", "idx": 1}, {"name": "my lesion", "idx": 2}]})
    assert reply.status_code == 200, reply.text


def test_error_messages_name_folders_not_server_paths(monkeypatch, tmp_path):
    """What the InputError handler sends: e.g. a model's ValueError naming the file it could not read."""
    import tempfile as tempfile_module

    from monailabel.config import settings

    from server.routes import hide_server_paths

    monkeypatch.setattr(settings, "MONAI_LABEL_STUDIES", str(tmp_path / "studies"))
    monkeypatch.setattr(settings, "MONAI_LABEL_APP_DIR", str(tmp_path / "app"))
    monkeypatch.setattr(tempfile_module, "tempdir", str(tmp_path / "tmp"))
    message = (f"cannot read {tmp_path}/studies/labels/final/ct1.nii.gz with {tmp_path}/app/model/x.pt "
               f"or {tmp_path}/tmp/raddiag-upload-1.nii.gz")
    assert hide_server_paths(message) == ("cannot read <studies>/labels/final/ct1.nii.gz with <app>/model/x.pt "
                                          "or <tmp>/raddiag-upload-1.nii.gz")
