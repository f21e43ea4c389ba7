"""The shipped demo model served from the app's default model path, on the bundled sample studies,
as the README starts it (no --conf model_path). Skipped while MONAILabelApp/model/raddiagseg-demo/
is not shipped. The answers must make sense: a trained model sees the phantoms' findings."""

import json
import shutil
from pathlib import Path

import pytest
import requests
import SimpleITK as sitk
from app_studies import APP_DIR, DEMO_MODEL
from live_server import server_factory  # noqa: F401  (fixture)

SAMPLE_STUDIES = APP_DIR / "sample-studies"
pytestmark = pytest.mark.skipif(
    not (DEMO_MODEL / "config.json").is_file() or not (DEMO_MODEL / "model.safetensors").is_file(),
    reason=f"the trained demo model is not shipped yet ({DEMO_MODEL} has no config.json/model.safetensors)",
)


@pytest.fixture(scope="module")
def served(server_factory, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("demo_model")
    studies = root / "studies"
    studies.mkdir()
    for path in SAMPLE_STUDIES.iterdir():  # the bundled studies, not the files a server wrote next to them
        if path.is_file() and path.name.endswith((".nii.gz", ".png")):
            shutil.copy(path, studies / path.name)
    server = server_factory(APP_DIR, studies, {"models": "raddiagseg", "work_dir": root / "work"})
    return {"server": server, "studies": studies}


def infer(server, image_id, **params):
    reply = requests.post(f"{server.url}/infer/raddiagseg", params={"image": image_id, "output": "json"},
                          data={"params": json.dumps(params)}, timeout=600)
    assert reply.status_code == 200, f"{reply.status_code}: {reply.text[:500]}\n{server.log()}"
    return reply.json()


def test_default_model_path_is_the_shipped_demo_model(served):
    info = requests.get(served["server"].url + "/info/", timeout=30).json()
    assert Path(info["models"]["raddiagseg"]["model_dir"]).resolve() == DEMO_MODEL.resolve()
    result = infer(served["server"], "cxr_normal")
    assert Path(result["model"]["dir"]).resolve() == DEMO_MODEL.resolve()
    assert (DEMO_MODEL / "MODEL_CARD.md").is_file()


def test_covid_xray_is_positive_with_named_lung_and_infection_segments(served):
    result = infer(served["server"], "cxr_covid")
    assert result["detection"] is True, result["answer"]
    assert result["diagnosis"] and "covid" in result["diagnosis"].lower(), result["answer"]
    names = [s["name"] for s in result["segments"]]
    assert "lung" in names, result["answer"]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(served["studies"] / "cxr_covid.png")))
    assert result["slices"] == [] and result["modality"] == "xray" and image.ndim == 2


def test_normal_xray_is_negative(served):
    result = infer(served["server"], "cxr_normal")
    assert result["detection"] is False, result["answer"]
    assert not any(s["role"] == "abnormality" for s in result["segments"]), result["segments"]


def test_liver_tumour_volume_is_positive_and_segments_liver_and_tumour(served):
    result = infer(served["server"], "ct_liver_tumour")
    volume = result["volume"]
    assert volume["n_slices"] == 16 and result["detection"] is True, volume
    assert result["diagnosis"] == "Liver tumour", volume
    assert {"liver", "liver tumour"} <= {s["name"] for s in result["segments"]}, result["segments"]
    assert result["answer"].startswith("1. Yes\n2. Liver tumour\n3."), result["answer"]
