"""Shared pieces of the team-serving tests: a tiny stand-in MONAI Label app (fast, controllable
delay, deterministic label), test images, users/tokens, starting MONAILabelApp/serve.py, and either
server of the app with MONAI Label's own client (`AppServer`)."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "MONAILabelApp" / "serve.py"

from live_server import ServerHandle, start_server

STUB_MAIN = textwrap.dedent('''
    """Stand-in app for serving tests: threshold 'model', counting trainer. Not RadDiag's model."""
    import json, os, tempfile, time
    import numpy as np
    import SimpleITK as sitk
    from monailabel.interfaces.app import MONAILabelApp
    from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
    from monailabel.interfaces.tasks.train import TrainTask
    from monailabel.tasks.activelearning.first import First


    class Threshold(InferTask):
        def __init__(self, delay):
            super().__init__(InferType.SEGMENTATION, ["bright"], 3, "threshold at the mean",
                             config={"question": "what is bright?", "max_new_tokens": 16})
            self.delay = delay

        def is_valid(self):
            return True

        def __call__(self, request):
            image = sitk.ReadImage(request["image"])
            array = sitk.GetArrayFromImage(image).astype(np.float32)
            time.sleep(self.delay)
            label = sitk.GetImageFromArray((array > array.mean()).astype(np.uint8))
            label.CopyInformation(image)
            out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
            sitk.WriteImage(label, out)
            return out, {"answer": "bright " + request.get("question", ""), "voxels": int((array > array.mean()).sum())}


    class Count(TrainTask):
        """'Trains' by counting final labels, step by step; publishes model.json atomically at the end."""

        def __init__(self, model_dir, step_s):
            super().__init__("count labels")
            self.model_dir, self.step_s = model_dir, step_s

        def __call__(self, request, datastore):
            n = len(datastore.datalist())
            for step in range(int(request.get("steps", 3))):
                print(f"step {step}", flush=True)
                time.sleep(self.step_s)
            path = os.path.join(self.model_dir, "model.json")
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"labels": n, "ts": time.time()}, f)
            os.replace(tmp, path)
            return {"labels": n}


    class StubApp(MONAILabelApp):
        def __init__(self, app_dir, studies, conf):
            self.delay = float(conf.get("delay", "0"))
            self.step_s = float(conf.get("step_s", "0.1"))
            super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="stub", description="serving tests")

        def init_infers(self):
            return {"raddiagseg": Threshold(self.delay)}

        def init_trainers(self):
            return {"raddiagseg": Count(os.path.join(self.app_dir, "model"), self.step_s)}

        def init_strategies(self):
            return {"first": First()}
''')


def write_stub_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(STUB_MAIN)
    return folder


def volume(shape=(6, 24, 20), seed=0, dtype=np.int16) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(-200, 200, size=shape).astype(dtype)
    array[:, 8:16, 6:14] += 600
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    return image


def write_image(path: Path, image: sitk.Image | None = None) -> Path:
    sitk.WriteImage(image if image is not None else volume(), str(path))
    return path


def make_users(auth_config: Path) -> dict:
    """One user per role; returns {role: token}."""
    from server.auth import add_user

    return {role: add_user(auth_config, f"{role}1", role) for role in ("user", "annotator", "admin")}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def send_infer(url, headers, image, params) -> socket.socket:
    """POST /infer/raddiagseg on a raw socket without reading the answer: a client that may hang up (close it)."""
    import requests

    prepared = requests.Request("POST", f"{url}/infer/raddiagseg", params={"image": image, "output": "json"},
                                headers=headers, data={"params": json.dumps(params)}).prepare()
    host, port = url.removeprefix("http://").split(":")
    head = f"POST {prepared.path_url} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in prepared.headers.items()) + "\r\n"
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode() + prepared.body.encode())
    return sock


def start_serve(app_dir, studies, auth_config, token, conf=None, extra=(), env=None, timeout=180):
    """Start serve.py like an admin would (loopback, free port) and wait for an authenticated /info/."""

    def command(args):
        return [sys.executable, str(SERVE), *args, "--auth-config", str(auth_config), "--log-level", "info", *extra]

    return start_server(app_dir, studies, conf, env=env, timeout=timeout, command=command, headers=bearer(token))


SERVER_KINDS = ("monailabel", "serve")  # `monailabel start_server`, and serve.py with a token


@dataclass
class AppServer:
    """One running server of an app: `monailabel start_server` (no token) or serve.py (`token` = an admin's)."""

    kind: str
    handle: ServerHandle
    token: str | None = None

    @property
    def url(self) -> str:
        return self.handle.url

    @property
    def headers(self) -> dict:
        return bearer(self.token) if self.token else {}

    def client(self, tmpdir):
        """MONAI Label's own client (the one its Slicer plugin ships), authenticated as the plugin does."""
        from monailabel.client import MONAILabelClient

        client = MONAILabelClient(self.url, tmpdir=str(tmpdir))
        if self.token:
            client.update_auth({"token_type": "Bearer", "access_token": self.token})
        return client

    def stop(self):
        self.handle.stop()


def start_app_server(kind, app_dir, studies, conf, workdir: Path, timeout=300, env=None) -> AppServer:
    """Start `kind` (one of SERVER_KINDS) on `studies` (a folder or a DICOMweb URL); serve.py gets users in
    workdir/auth.json and an admin token."""
    if kind == "monailabel":
        return AppServer(kind, start_server(app_dir, studies, conf, env=env, timeout=timeout))
    tokens = make_users(workdir / "auth.json")
    handle = start_serve(app_dir, studies, workdir / "auth.json", tokens["admin"], conf=conf, env=env, timeout=timeout)
    return AppServer(kind, handle, tokens["admin"])
