"""Start a real `monailabel start_server` on 127.0.0.1 for integration tests, and stop it.

    from live_server import start_server
    with start_server("MONAILabelApp", studies_dir, {"model_path": str(model_dir)}) as server:
        requests.get(server.url + "/info/")

or, in a test module, the `server_factory` fixture (module scope; every server it starts is
stopped when the module's tests are done; tests/conftest.py registers it for every test):

    @pytest.fixture(scope="module")
    def server(server_factory, tmp_path_factory):
        return server_factory(APP_DIR, studies, {"model_path": ...})

The server runs with MONAI_LABEL_TRACKING_ENABLED=false on a free port, in its own process
group (so training subprocesses it starts are stopped with it); its output goes to
`handle.log_path`, and `handle.log()` returns the tail for assertion messages. `command` lets a
caller start another launcher (e.g. the team-serving wrapper) with the same handling: it gets
the argument list and must return the full command line.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerHandle:
    url: str
    process: subprocess.Popen
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    def log(self, tail=6000):
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def alive(self):
        return self.process.poll() is None

    def stop(self, timeout=20):
        """Stop the server and every process it started (SIGTERM, then SIGKILL)."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def monailabel_command(args):
    return [sys.executable, "-m", "monailabel.main", "start_server", *args]


def start_server(app_dir, studies_dir, conf=None, env=None, timeout=180, port=None, command=monailabel_command,
                 headers=None):
    """Start a server and wait until GET /info/ answers 200; raise RuntimeError with its log if it does not.

    `headers` go with the readiness poll (e.g. an Authorization header for a server that requires a token)."""
    port = port or free_port()
    args = ["--app", str(app_dir), "--studies", str(studies_dir), "--host", "127.0.0.1", "--port", str(port)]
    for key, value in (conf or {}).items():
        args += ["--conf", str(key), str(value)]
    environment = {**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false", "PYTHONUNBUFFERED": "1", **(env or {})}
    log_path = Path(tempfile.mkdtemp(prefix="monailabel-")) / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command(args), stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=str(ROOT), start_new_session=True
        )
    handle = ServerHandle(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not handle.alive():
            raise RuntimeError(f"monailabel server exited with code {process.returncode}:\n{handle.log()}")
        try:
            if requests.get(handle.url + "/info/", timeout=5, headers=headers).status_code == 200:
                return handle
        except requests.RequestException:
            pass
        time.sleep(0.5)
    handle.stop()
    raise RuntimeError(f"monailabel server did not answer /info/ within {timeout}s:\n{handle.log()}")


def wait_for_training(url, timeout=600, poll=1.0, headers=None):
    """Poll GET /train/ until the latest training task is DONE or ERROR; return its status dict."""
    deadline = time.time() + timeout
    status = {}
    while time.time() < deadline:
        reply = requests.get(url + "/train/", timeout=10, headers=headers)
        if reply.status_code == 200:
            status = reply.json()
            if status.get("status") in ("DONE", "ERROR"):
                return status
        time.sleep(poll)
    raise TimeoutError(f"training did not finish within {timeout}s; last status {status}")


@pytest.fixture(scope="module")
def server_factory():
    """Callable with start_server's arguments; servers are stopped at the end of the test module."""
    handles = []

    def factory(*args, **kwargs):
        handle = start_server(*args, **kwargs)
        handles.append(handle)
        return handle

    yield factory
    for handle in handles:
        handle.stop()
