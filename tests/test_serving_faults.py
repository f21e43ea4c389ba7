"""Crash safety of datastore writes made through serve.py: a write killed half-way never replaces
or corrupts what was saved before, and leftovers are cleaned on the next start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from serving_helpers import ROOT, bearer

from server.datastore_safety import PARTIAL_PREFIX, atomic_copy, remove_partial_files

COPY_FROM_FIFO = """
from server.datastore_safety import atomic_copy
atomic_copy({src!r}, {dst!r})
"""


def test_a_copy_killed_half_way_leaves_the_old_label_and_is_cleaned_up(tmp_path):
    dst = tmp_path / "labels" / "final" / "ct1.nii.gz"
    dst.parent.mkdir(parents=True)
    dst.write_bytes(b"old label")
    fifo = tmp_path / "upload.fifo"
    os.mkfifo(fifo)
    code = COPY_FROM_FIFO.format(src=str(fifo), dst=str(dst))
    copier = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT / "MONAILabelApp")  # `server` from the app folder
    with open(fifo, "wb") as writer:
        writer.write(b"new label, first half " * 5000)
        writer.flush()
        time.sleep(0.5)
        os.kill(copier.pid, signal.SIGKILL)  # the server dies mid-write
        copier.wait(timeout=10)
    assert dst.read_bytes() == b"old label"
    leftovers = [p for p in dst.parent.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    assert leftovers, "the half-written copy should sit in a hidden temporary file"
    assert remove_partial_files(tmp_path) == [str(p) for p in leftovers]
    assert sorted(p.name for p in dst.parent.iterdir()) == ["ct1.nii.gz"]


def test_completed_copy_replaces_the_file(tmp_path):
    src, dst = tmp_path / "new.nii.gz", tmp_path / "old.nii.gz"
    image = sitk.GetImageFromArray(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    sitk.WriteImage(image, str(src))
    dst.write_bytes(b"previous")
    atomic_copy(src, dst)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(dst))), np.arange(24).reshape(2, 3, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.nii.gz", "old.nii.gz"]


def test_patched_datastore_saves_labels_and_reopens_cleanly(tmp_path):
    """With atomic writes installed, MONAI Label's LocalDatastore still saves, indexes and reopens labels."""
    from monailabel.datastore.local import LocalDatastore

    from server.datastore_safety import install_atomic_writes

    studies = tmp_path / "studies"
    studies.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(studies / "a.nii.gz"))
    store = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    assert install_atomic_writes(store)
    label = tmp_path / "label.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 4, 5), np.uint8)), str(label))
    store.save_label("a", str(label), "final", {"answer": "1. No"})
    index = json.loads((studies / "datastore_v2.json").read_text())
    assert index["objects"]["a"]["labels"]["final"]["info"]["answer"] == "1. No"
    assert not [p for p in studies.rglob(PARTIAL_PREFIX + "*")]
    reopened = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    assert reopened.get_label_info("a", "final")["answer"] == "1. No"


# ---------------------------------------------------------------- issue 18, items 5 and 6, through serve.py

def _label_file(path, value):
    label = sitk.GetImageFromArray(np.full((6, 24, 20), value, np.uint8))
    label.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(label, str(path))
    return path


def _put_label(server, headers, image, path, answer):
    reply = requests.put(f"{server.url}/datastore/label?image={image}", headers=headers,
                         data={"params": json.dumps({"answer": answer})},
                         files={"label": ("label.nii.gz", path.read_bytes())}, timeout=60)
    assert reply.status_code == 200, reply.text


def _served_pair(server, headers, image):
    """(label voxel value, label answer) as a client reads them back."""
    data = requests.get(f"{server.url}/datastore/label?label={image}&tag=final", headers=headers, timeout=30)
    assert data.status_code == 200, data.text[:300]
    path = Path(tempfile.mkdtemp()) / "label.nii.gz"
    path.write_bytes(data.content)
    values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    info = requests.get(f"{server.url}/datastore/label/info?label={image}&tag=final", headers=headers, timeout=30)
    return int(values.max()), info.json().get("answer")


@dataclass
class Site:
    """A studies folder and its users; ``start()`` serves it with serve.py (the stand-in app)."""

    base: Path
    studies: Path
    headers: dict

    def start(self):
        from serving_helpers import start_serve, write_stub_app

        return start_serve(write_stub_app(self.base / "app"), self.studies, self.base / "auth.json",
                           self.headers["Authorization"].split()[1])


@pytest.fixture
def site(tmp_path):
    from serving_helpers import make_users, write_image

    studies = tmp_path / "studies"
    studies.mkdir()
    write_image(studies / "ct1.nii.gz")
    write_image(studies / "ct2.nii.gz")
    return Site(tmp_path, studies, bearer(make_users(tmp_path / "auth.json")["admin"]))


def test_index_writes_stay_atomic_after_reload_and_a_torn_index_is_recovered(site):
    base, studies, headers = site.base, site.studies, site.headers
    index = studies / "datastore_v2.json"
    server = site.start()
    try:
        _put_label(server, headers, "ct1", _label_file(base / "one.nii.gz", 1), "1. No")
        assert requests.post(server.url + "/reload", headers=headers, timeout=60).status_code == 200
        inode = index.stat().st_ino
        _put_label(server, headers, "ct2", _label_file(base / "two.nii.gz", 2), "2. Yes")
        assert index.stat().st_ino != inode, "after /reload the index was rewritten in place, not replaced"
        assert json.loads((studies / "datastore_v2.json.last-good").read_text()) == json.loads(index.read_text())
    finally:
        server.stop()
    index.write_bytes(b"")  # what kill -9 during an in-place write leaves
    server = site.start()
    try:
        assert _served_pair(server, headers, "ct1") == (1, "1. No")
        assert _served_pair(server, headers, "ct2") == (2, "2. Yes")
    finally:
        server.stop()
    assert [p.name.startswith("datastore_v2.json.broken-") for p in studies.iterdir()].count(True) == 1
    index.write_text('{"name": "torn')
    (studies / "datastore_v2.json.last-good").unlink()
    server = site.start()  # nothing readable left: it still starts, from the files
    try:
        assert _served_pair(server, headers, "ct1")[0] == 1
    finally:
        server.stop()


CRASH_AT = """
import os, signal
from monailabel.datastore.local import LocalDatastore
from server.datastore_safety import install_atomic_writes

store = LocalDatastore({studies!r}, extensions=["*.nii.gz"])
install_atomic_writes(store)
rename = os.replace

def replace(src, dst):
    if str(dst).endswith({crash_at!r}):
        os.kill(os.getpid(), signal.SIGKILL)  # the server dies right before this rename
    rename(src, dst)

os.replace = replace
store.save_label("ct1", {label!r}, "final", {{"answer": "2. Yes"}})
"""


@pytest.mark.parametrize("crash_at,expected", [
    ("labels/final/ct1.nii.gz", (1, "1. No")),  # before the label rename: the old pair
    ("datastore_v2.json", (2, "2. Yes")),  # between the label and the index renames: the new pair
])
def test_a_kill_between_label_and_index_renames_never_mixes_the_pairs(site, crash_at, expected):
    base, studies, headers = site.base, site.studies, site.headers
    server = site.start()
    try:
        _put_label(server, headers, "ct1", _label_file(base / "old.nii.gz", 1), "1. No")
    finally:
        server.stop()
    code = CRASH_AT.format(studies=str(studies), crash_at=crash_at, label=str(_label_file(base / "new.nii.gz", 2)))
    crashed = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "MONAILabelApp", capture_output=True, timeout=120)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    server = site.start()
    try:
        assert _served_pair(server, headers, "ct1") == expected
    finally:
        server.stop()
    assert not list(studies.glob(".pending-label-*")) and not list(studies.rglob(PARTIAL_PREFIX + "*"))


# ---------------------------------------------------------------- issue 18, item 12: training outliving the server

SLOW_TRAINER = """
import sys, time
from lib.trainers.raddiagseg import RadDiagSegTrain

class Slow(RadDiagSegTrain):  # the real task around a training step that takes minutes
    def _train(self, request, datastore, stats):
        time.sleep(300)
        return {}

Slow(None, sys.argv[1])({}, None)
"""
STAND_IN_SERVER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]],
                         env={**os.environ, "RADDIAG_SERVER_PID": str(os.getpid())})
print(child.pid, flush=True)
time.sleep(600)
"""


def _gone(pid, timeout):
    """True once ``pid`` has exited (a zombie waiting for its new parent counts as exited)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X"):
                return True
        except (FileNotFoundError, IndexError):
            return True
        time.sleep(0.1)
    return False


def _start_training(tmp_path, server=True):
    """A training run as MONAI Label starts it (a subprocess of the server); returns (server, trainer pid)."""
    work = tmp_path / "work"
    if server:
        parent = subprocess.Popen([sys.executable, "-c", STAND_IN_SERVER, SLOW_TRAINER, str(work)],
                                  cwd=ROOT / "MONAILabelApp", stdout=subprocess.PIPE, text=True)
        pid = int(parent.stdout.readline())
    else:
        parent = subprocess.Popen([sys.executable, "-c", SLOW_TRAINER, str(work)], cwd=ROOT / "MONAILabelApp")
        pid = parent.pid
    from lib.trainers.raddiagseg import RadDiagSegTrain

    task = RadDiagSegTrain(None, work)
    deadline = time.time() + 60
    while task.stats().get("pid") != pid:
        assert time.time() < deadline, "the training run did not start"
        time.sleep(0.2)
    return parent, pid, task


def test_a_training_run_stops_when_its_server_is_killed_and_no_second_one_starts_beside_it(tmp_path):
    from lib.train_guard import TrainingBusy

    server, pid, task = _start_training(tmp_path)
    try:
        with pytest.raises(TrainingBusy, match=f"pid {pid}"):
            task({}, None)
        assert task.stats()["status"] == "RUNNING" and task.stats()["pid"] == pid  # left alone
        server.kill()  # kill -9: the server cannot stop its child itself
        server.wait()
        assert _gone(pid, timeout=10), "the training run outlived its server"
        stats = task.stats()
        assert stats["status"] == "INTERRUPTED" and "server" in stats["error"]
    finally:
        server.kill()
        if not _gone(pid, 0):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_training_run_is_reported_interrupted_not_running(tmp_path):
    trainer, pid, task = _start_training(tmp_path, server=False)
    trainer.kill()
    trainer.wait()
    stats = task.stats()
    assert stats["status"] == "INTERRUPTED" and "killed" in stats["error"]
    assert json.loads((tmp_path / "work" / "train_stats.json").read_text())["status"] == "INTERRUPTED"
