"""Crash safety of datastore writes made through serve.py: a write killed half-way never replaces
or corrupts what was saved before, and leftovers are cleaned on the next start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import SimpleITK as sitk
from serving_helpers import ROOT

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
