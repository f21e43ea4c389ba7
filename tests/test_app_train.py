"""Acceptance: save a corrected label with label info, train through the server, and the next infer uses the
newly published model, whose answer on the corrected slice follows the correction."""

import json
import os

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from app_server import infer_json
from app_studies import DEMO_MODEL
from live_server import wait_for_training

pytest.importorskip("raddiagseg.training")
TRAIN_STEPS = int(os.environ.get("RADDIAG_APP_TEST_TRAIN_STEPS", "80"))


@pytest.fixture(scope="module")
def served(app_server):
    return app_server("train", model=DEMO_MODEL if (DEMO_MODEL / "config.json").is_file() else "random")


def test_correction_trains_publishes_and_is_served_without_restart(served, tmp_path):
    server = served["server"]
    _, label = served["studies"]["ct_liver"]
    labels = sitk.GetArrayFromImage(label)
    k = int(np.argmax([(labels[i] == 2).sum() for i in range(labels.shape[0])]))  # slice with the most tumour
    assert (labels[k] == 2).any()
    before = infer_json(server, "ct_liver", {"slice": k, "max_new_tokens": 48})

    label_path = tmp_path / "corrected.nii.gz"
    sitk.WriteImage(label, str(label_path))
    info = {"segments": [{"name": "liver", "label_value": 1}, {"name": "liver tumour", "label_value": 2}],
            "detection": True, "diagnosis": "Liver tumour", "slice": k}
    with open(label_path, "rb") as handle:
        saved = requests.put(f"{server.url}/datastore/label", params={"image": "ct_liver", "tag": "final"},
                             files={"label": ("corrected.nii.gz", handle)}, data={"params": json.dumps(info)}, timeout=60)
    assert saved.status_code == 200, saved.text

    started = requests.post(f"{server.url}/train/raddiagseg", json={"max_steps": TRAIN_STEPS}, timeout=60)
    assert started.status_code == 200, started.text
    status = wait_for_training(server.url, timeout=900)
    stats = requests.get(server.url + "/info/", timeout=10).json()["train_stats"]["raddiagseg"]
    assert status["status"] == "DONE", f"{status}\n{stats}\n{server.log()}"
    assert stats["step"] == TRAIN_STEPS and stats["data"]["train_samples"] >= 3
    assert stats["published"] is True, stats
    assert stats["new_metric"] >= stats["baseline_metric"]

    after = infer_json(server, "ct_liver", {"slice": k, "max_new_tokens": 48})
    assert after["model"]["version"] != before["model"]["version"]
    assert "/models/v0001-" in after["model"]["dir"]
    assert after["detection"] is True, after["answer"]
    assert after["diagnosis"] and "liver tumour" in after["diagnosis"].lower(), after["answer"]
