"""The real RadDiag app (MONAILabelApp, randomly initialised demo model) served through serve.py:
token-protected inference, /info/ answering while the model runs, and faults — a killed training
run and a server killed during a label upload lose nothing, and a restart restores everything."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import SimpleITK as sitk
from app_server import post_infer
from serving_helpers import bearer, make_users, start_serve

app_studies = pytest.importorskip("app_studies")


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("realapp")
    studies = app_studies.write_studies(root / "studies")
    model_dir = app_studies.random_model_dir(root / "model")
    tokens = make_users(root / "auth.json")
    conf = {"model_path": model_dir, "work_dir": root / "work"}
    return {"root": root, "studies": studies, "model_dir": model_dir, "tokens": tokens, "conf": conf}


def serve(setup):
    return start_serve(app_studies.APP_DIR, setup["root"] / "studies", setup["root"] / "auth.json",
                       setup["tokens"]["user"], conf=setup["conf"], timeout=300)


def infer(url, token, image_id, **params):
    return post_infer(url, image_id, {"max_new_tokens": 8, **params}, headers=bearer(token))


def save_label(url, token, setup):
    ct, ct_label = setup["studies"]["ct_liver"]
    path = setup["root"] / "ct_liver_label.nii.gz"
    sitk.WriteImage(ct_label, str(path))
    info = {"segments": [{"name": "liver", "label_value": 1, "role": "organ"},
                         {"name": "liver tumour", "label_value": 2, "role": "abnormality"}],
            "detection": True, "diagnosis": "Liver tumour"}
    with open(path, "rb") as f:
        reply = requests.put(url + "/datastore/label?image=ct_liver", headers=bearer(token),
                             files={"label": ("ct_liver.nii.gz", f)}, data={"params": json.dumps(info)}, timeout=120)
    assert reply.status_code == 200, reply.text
    return sitk.GetArrayFromImage(ct_label)


def label_file(setup):
    return setup["root"] / "studies" / "labels" / "final" / "ct_liver.nii.gz"


def test_real_app_serves_with_tokens_and_stays_responsive_then_survives_faults(setup):
    tokens = setup["tokens"]
    server = serve(setup)
    try:
        url = server.url
        assert infer(url, "wrong", "ct_liver").status_code == 401
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(infer, url, tokens["user"], "ct_liver")  # whole volume: several seconds on CPU
            time.sleep(0.5)
            waits = []
            while not running.done():
                start = time.perf_counter()
                assert requests.get(url + "/info/", headers=bearer(tokens["user"]), timeout=30).status_code == 200
                waits.append(time.perf_counter() - start)
                time.sleep(0.2)
            reply = running.result()
        assert reply.status_code == 200, server.log()
        assert isinstance(reply.json()["answer"], str)
        assert waits and max(waits) < 2.0, waits  # /info/ answered while the model ran
        assert infer(url, tokens["user"], "ct_liver", device="cuda:3").status_code == 400
        # every option the app's infer task offers passes serve.py's whitelist with valid values
        options = {"tts": True, "tts_answers": 2, "tts_masks": 2, "rvls2m": None, "cot": False, "temperature": 0.7,
                   "batch_size": 2, "do_sample": False, "result_extension": ".seg.nrrd", "modality": "xray"}
        reply = infer(url, tokens["user"], "cxr_covid", **options)
        assert reply.status_code == 200, reply.text
        assert reply.json()["agreement"]["paths"] == 2
        for bad in ({"rvls2m": "maybe"}, {"tts_answers": "four"}, {"cot": "sometimes"}):
            reply = infer(url, tokens["user"], "cxr_covid", **bad)
            assert reply.status_code == 400 and list(bad)[0] in reply.json()["detail"], reply.text
        refused = requests.post(url + "/activelearning/uncertain", headers=bearer(tokens["user"]),
                                json={"max_new_tokens": 0}, timeout=30)  # the strategy's own 400 passes through
        assert refused.status_code == 400 and "max_new_tokens" in refused.json()["detail"], refused.text

        saved = save_label(url, tokens["annotator"], setup)
        label_before = label_file(setup).read_bytes()
        model_before = digest(setup["model_dir"])

        # start training, then kill the training process half-way
        admin = bearer(tokens["admin"])
        reply = requests.post(url + "/train/raddiagseg", headers=admin, json={"max_steps": 2000}, timeout=60)
        assert reply.status_code == 200, reply.text
        trainer = None
        deadline = time.time() + 120
        while trainer is None and time.time() < deadline:
            for child in psutil.Process(server.process.pid).children(recursive=True):
                try:
                    cmd = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                if "monailabel.interfaces.utils.app" in cmd and "train" in cmd:
                    trainer = child
            time.sleep(0.5)
        assert trainer is not None, server.log()
        time.sleep(8)  # let it load the data and the model and start writing
        trainer.kill()
        deadline = time.time() + 60
        while time.time() < deadline:
            status = requests.get(url + "/train/", headers=admin, timeout=10).json()
            if status.get("status") in ("DONE", "ERROR"):
                break
            time.sleep(0.5)
        assert status.get("status") == "ERROR", status
        assert digest(setup["model_dir"]) == model_before
        assert not (setup["root"] / "work" / "models" / "CURRENT").exists()
        assert label_file(setup).read_bytes() == label_before
        assert infer(url, tokens["user"], "cxr_covid").status_code == 200

        # kill the whole server while a label upload is streaming in
        host, port = url.removeprefix("http://").split(":")
        boundary = "rdboundary"
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="cxr.png"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall((f"PUT /datastore/label?image=ct_liver HTTP/1.1\r\nHost: {host}\r\n"
                          f"Authorization: Bearer {tokens['annotator']}\r\n"
                          f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                          f"Content-Length: {8 * 1024 * 1024}\r\n\r\n").encode() + head)
            sock.sendall(b"\1" * (2 * 1024 * 1024))
            time.sleep(1.0)
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=30)
    finally:
        server.stop()

    # restart: labels, label info and the served model are all back
    server = serve(setup)
    try:
        url = server.url
        assert label_file(setup).read_bytes() == label_before
        assert not list((setup["root"] / "studies").rglob(".partial-*"))
        index = json.loads((setup["root"] / "studies" / "datastore_v2.json").read_text())
        assert index["objects"]["ct_liver"]["labels"]["final"]["info"]["diagnosis"] == "Liver tumour"
        got = requests.get(url + "/datastore/label?label=ct_liver&tag=final", headers=bearer(tokens["user"]), timeout=30)
        assert got.status_code == 200
        (setup["root"] / "got.nii.gz").write_bytes(got.content)
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(setup["root"] / "got.nii.gz"))), saved)
        info = requests.get(url + "/info/", headers=bearer(tokens["user"]), timeout=30).json()
        assert info["models"]["raddiagseg"]["model"]["name"] == Path(setup["model_dir"]).name
        assert str(setup["root"]) not in json.dumps(info["models"])  # the model is named, its server path is not
        assert infer(url, tokens["user"], "cxr_covid").status_code == 200
    finally:
        server.stop()
