"""MONAI Label's own client through the whole annotation journey, on both servers of the app.

`monailabel.client.MONAILabelClient` from the installed wheel is the client the stock MONAI Label
Slicer plugin ships. It runs against `monailabel start_server` and against serve.py with an admin
token (set with `update_auth`, as the plugin does): info, upload_image, infer (default output,
`.nrrd`, `.nii.gz`, `result_dtype`), save_label in the plugin's `label_info` format and in ours,
datastore, download_label, next_sample for every listed strategy, train_start / train_status /
train_stop. A randomly initialised demo-preset model is served: its answers are gibberish, but label
files, geometry, the saved labels and the training run built from them are real.

The stock Slicer plugin signs in with its own dialog (`auth_enabled`, `auth_token`, `auth_valid_token`, then
`update_auth`) and its buttons send the `config` that `/info/` lists for the model, trainer or strategy, a
list standing for its first item: both are checked as the plugin makes those calls, with its client id.

The last tests make the requests of MONAI Label's own black-box integration tests for radiology
apps (`tests/integration/radiology/test_info.py`, `test_infer.py`, `test_trainer.py` in
Project-MONAI/MONAILabel) with the same assertions, adapted only for our model name, image ids and
(serve.py) the token.
"""

import json
import time

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from app_studies import APP_DIR, assert_same_geometry, random_model_dir, write_studies
from live_server import wait_for_training
from serving_helpers import SERVER_KINDS, start_app_server, volume, write_image

pytest.importorskip("raddiagseg.training")
from raddiagseg import vocabulary  # noqa: E402

MODEL = "raddiagseg"
STOCK_LABEL_INFO = {"label_info": [{"name": "liver", "idx": 1}, {"name": "liver tumour", "idx": 2}], "model": MODEL}
OUR_LABEL_INFO = {"segments": [{"name": "lung", "label_value": 1}, {"name": "infection", "label_value": 2}],
                  "detection": True, "diagnosis": "COVID-19 infection"}
SHORT = {"max_new_tokens": 12}  # random weights never stop early: keep answers short
PLUGIN_CLIENT_ID = "user-xyz"  # the stock plugin's default client id (its settings), sent with every request


def plugin_params(info, section, name):
    """The params a stock plugin button sends: the `config` /info/ lists for that model, trainer or strategy, with
    the first item of a list (a choice)."""
    return {key: value[0] if isinstance(value, list) else value
            for key, value in info[section][name].get("config", {}).items()}


@pytest.fixture(scope="module", params=SERVER_KINDS)
def served(request, tmp_path_factory):
    """One server per kind for the whole module; `saved` carries what earlier steps of the journey saved."""
    root = tmp_path_factory.mktemp(request.param)
    studies = write_studies(root / "studies")
    model_dir = random_model_dir(root / "model")
    server = start_app_server(request.param, APP_DIR, root / "studies",
                              {"model_path": model_dir, "work_dir": root / "work"}, root)
    (root / "client").mkdir()
    try:
        yield {"server": server, "client": server.client(root / "client"), "studies": studies, "root": root,
               "saved": {}}
    finally:
        server.stop()


def keep(path, folder, name):
    """The client writes every result under the name the server gave it: keep a copy under our own."""
    target = folder / name
    target.write_bytes(open(path, "rb").read())
    return target


def test_info_lists_model_labels_strategies_and_trainer(served):
    info = served["client"].info()
    assert info["name"] == "RadDiag" and info["version"]
    names = [t["name"] for t in vocabulary.load()["targets"]]
    assert set(names) <= set(info["labels"]) and set(names) <= set(info["models"][MODEL]["labels"])
    assert info["models"][MODEL]["type"] == "segmentation"
    assert set(info["strategies"]) == {"uncertain", "random", "first"}
    assert MODEL in info["trainers"]


def test_the_plugin_signs_in_and_its_infer_and_next_sample_buttons_work(served):
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    server, root = served["server"], served["root"]
    (root / "plugin").mkdir()
    plugin = MONAILabelClient(server.url, tmpdir=str(root / "plugin"), client_id=PLUGIN_CLIENT_ID)
    if server.kind == "monailabel":
        assert plugin.auth_enabled() is False  # no sign-in dialog: every call goes without a token
    else:
        assert plugin.auth_enabled() is True  # the plugin shows its sign-in dialog
        for name, password in (("admin1", "not-the-token"), ("user1", server.token), ("admin1", "")):
            with pytest.raises(MONAILabelClientException) as refused:
                plugin.auth_token(name, password)
            assert refused.value.status_code == 401 and "user name and token do not match" in refused.value.msg
        assert plugin.auth_valid_token() is False
        with pytest.raises(MONAILabelClientException) as no_token:
            plugin.info()
        assert no_token.value.status_code == 401
        token = plugin.auth_token("admin1", server.token)
        assert token == {"access_token": server.token, "token_type": "bearer"}
        plugin.update_auth(token)
        assert plugin.auth_valid_token() is True

    info = plugin.info()
    params = plugin_params(info, "models", MODEL)
    assert params["question"] and params["result_extension"] == ".nii.gz"
    label_file, result = plugin.infer(MODEL, "cxr_covid", params)
    xray = served["studies"]["cxr_covid"][0]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(label_file))
    assert labels.shape == xray.shape and set(np.unique(labels)) <= {0, *result["label_names"].values()}
    assert isinstance(result["answer"], str) and result["model"]
    for strategy in info["strategies"]:
        assert plugin.next_sample(strategy, plugin_params(info, "strategies", strategy))["id"] in ("ct_liver", "cxr_covid")


def test_upload_image_then_infer_on_it(served, tmp_path):
    client, root = served["client"], served["root"]
    image = volume(shape=(4, 32, 28), seed=1)
    path = write_image(root / "ct_upload.nii.gz", image)
    reply = client.upload_image(str(path), image_id="ct_upload")
    assert reply["image"] == "ct_upload"
    assert "ct_upload" in client.datastore()["objects"]
    label_file, result = client.infer(MODEL, "ct_upload", {"slice": 2, **SHORT})
    labels = assert_same_geometry(label_file, image)
    assert result["slices"][0]["slice"] == 2 and not np.delete(labels, 2, axis=0).any()


def test_infer_default_output_nrrd_nii_gz_and_uint8(served):
    client, root = served["client"], served["root"]
    image = served["studies"]["ct_liver"][0]
    default_file, result = client.infer(MODEL, "ct_liver", {"slice": 4, **SHORT})
    assert default_file.endswith(".nii.gz") and result["modality"]["value"] == "ct"
    default = assert_same_geometry(keep(default_file, root, "default.nii.gz"), image)
    assert set(np.unique(default)) <= {0, *result["label_names"].values()}
    assert not np.delete(default, 4, axis=0).any()  # only the asked slice (numpy axis 0 is the file's k)
    for extension in (".nrrd", ".nii.gz"):
        label_file, again = client.infer(MODEL, "ct_liver", {"slice": 4, "result_extension": extension, **SHORT})
        assert label_file.endswith(extension) and again["label_names"] == result["label_names"]
        assert np.array_equal(assert_same_geometry(label_file, image), default), extension
    label_file, _ = client.infer(MODEL, "ct_liver", {"slice": 4, "result_dtype": "uint8", **SHORT})
    assert sitk.ReadImage(label_file).GetPixelID() == sitk.sitkUInt8
    xray = served["studies"]["cxr_covid"][0]
    label_file, result = client.infer(MODEL, "cxr_covid", dict(SHORT))
    assert result["modality"]["value"] == "xray" and sitk.GetArrayFromImage(sitk.ReadImage(label_file)).shape == xray.shape


def test_save_label_in_the_stock_plugin_format_and_ours(served):
    client, root, saved = served["client"], served["root"], served["saved"]
    ct, ct_label = served["studies"]["ct_liver"]
    sitk.WriteImage(ct_label, str(root / "ct_liver_label.nii.gz"))
    # the plugin lists every segment of the Segment Editor, also one left empty with Slicer's default name
    stock = {**STOCK_LABEL_INFO, "label_info": [*STOCK_LABEL_INFO["label_info"], {"name": "Segment_3", "idx": 3}]}
    reply = client.save_label("ct_liver", str(root / "ct_liver_label.nii.gz"), tag="final", params=stock)
    assert reply["image"] == "ct_liver"
    saved["ct_liver"] = reply["label"]

    xray = served["studies"]["cxr_covid"][1]
    lung_infection = xray.lung.astype(np.uint8)
    lung_infection[xray.infection > 0] = 2
    assert (lung_infection == 2).any()
    sitk.WriteImage(sitk.GetImageFromArray(lung_infection), str(root / "cxr_label.nii.gz"))
    reply = client.save_label("cxr_covid", str(root / "cxr_label.nii.gz"), tag="final", params=dict(OUR_LABEL_INFO))
    saved["cxr_covid"] = reply["label"]

    objects = client.datastore()["objects"]
    final = objects["ct_liver"]["labels"]["final"]
    assert final["info"]["label_info"] == stock["label_info"]
    assert objects["cxr_covid"]["labels"]["final"]["info"]["diagnosis"] == "COVID-19 infection"
    assert not objects["ct_upload"]["labels"]


def test_download_label_gives_back_what_was_saved(served):
    client = served["client"]
    ct, ct_label = served["studies"]["ct_liver"]
    downloaded = client.download_label(served["saved"]["ct_liver"], "final")
    assert np.array_equal(assert_same_geometry(downloaded, ct), sitk.GetArrayFromImage(ct_label))
    downloaded = client.download_label(served["saved"]["cxr_covid"], "final")
    assert (sitk.GetArrayFromImage(sitk.ReadImage(downloaded)) == 2).any()


def test_next_sample_for_every_listed_strategy_proposes_the_unlabelled_image(served):
    client = served["client"]
    for strategy in client.info()["strategies"]:
        reply = client.next_sample(strategy, dict(SHORT))
        assert reply["id"] == "ct_upload", (strategy, reply)
    assert 0.0 <= client.next_sample("uncertain", dict(SHORT))["score"] <= 1.0


def expected_train_samples(served):
    """vqaseg + one refseg per segment present, for every labelled CT slice and for the X-ray."""
    labels = sitk.GetArrayFromImage(served["studies"]["ct_liver"][1])
    ct = sum(1 + len(set(np.unique(labels[k])) - {0}) for k in range(labels.shape[0]) if labels[k].any())
    return ct + 3


def test_train_start_stop_then_train_with_params_on_the_stock_format(served):
    from monailabel.client.client import MONAILabelClientException

    client, root, server = served["client"], served["root"], served["server"]
    label = np.zeros((4, 32, 28), np.uint8)
    label[:, 8:16, 6:14] = 1
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(volume(shape=(4, 32, 28), seed=1))
    sitk.WriteImage(label_image, str(root / "upload_label.nii.gz"))
    client.save_label("ct_upload", str(root / "upload_label.nii.gz"), tag="final",
                      params={"label_info": [{"name": "Segment_1", "idx": 1}]})
    # label info training cannot read (a question that is not text): serve.py refuses it when it is saved,
    # `monailabel start_server` stores it and training leaves that one label out with the reason
    client.upload_image(str(root / "ct_upload.nii.gz"), image_id="ct_bad_info")
    bad_info = {"label_info": [{"name": "liver", "idx": 1}], "question": 5}
    if server.kind == "serve":
        with pytest.raises(MONAILabelClientException) as refused:
            client.save_label("ct_bad_info", str(root / "upload_label.nii.gz"), tag="final", params=bad_info)
        assert "Status: 400" in refused.value.msg and "question must be non-empty text" in refused.value.msg
    else:
        client.save_label("ct_bad_info", str(root / "upload_label.nii.gz"), tag="final", params=bad_info)

    # the plugin's Train button sends the trainer's config from /info/; its Stop button stops the run
    started = client.train_start(MODEL, plugin_params(client.info(), "trainers", MODEL))
    assert started["status"] in ("SUBMITTED", "RUNNING")  # MONAI Label answers before its runner thread starts
    deadline = time.time() + 600
    while client.info()["train_stats"][MODEL].get("status") != "RUNNING":  # the train task itself has started
        assert time.time() < deadline and client.train_status()["status"] in ("SUBMITTED", "RUNNING"), server.handle.log()
        time.sleep(1)
    stopped = client.train_stop()
    assert stopped["status"] == "STOPPED"
    assert client.train_status()["status"] == "STOPPED" and client.train_status(check_if_running=True) is False

    client.train_start(MODEL, {"max_steps": 3})
    status = wait_for_training(server.url, timeout=600, headers=server.headers)
    stats = client.info()["train_stats"][MODEL]
    assert status["status"] == "DONE", f"{stats}\n{server.handle.log()}"
    assert stats["status"] == "DONE" and stats["step"] == 3
    data = stats["data"]
    assert data["images"] == 2 and data["train_samples"] == expected_train_samples(served), data
    skipped = {entry["image"]: entry["reason"] for entry in data["skipped"]}
    assert "no segment name RadDiag knows ('Segment_1')" in skipped.pop("ct_upload")
    if server.kind == "monailabel":
        assert "question must be non-empty text" in skipped.pop("ct_bad_info")
    assert skipped == {}
    [empty_segment] = data["skipped_segments"]  # the plugin's empty "Segment_3": named, not trained on
    assert (empty_segment["image"], empty_segment["segment"], empty_segment["label_value"]) == ("ct_liver", "Segment_3", 3)
    assert "not a target RadDiag knows" in empty_segment["reason"]


# ---- MONAI Label's integration tests for radiology apps (tests/integration/radiology), our model and images ----


def test_monailabel_integration_info(served):
    url, headers = served["server"].url, served["server"].headers
    response = requests.get(f"{url}/info/", headers=headers)
    assert response.status_code == 200

    # check if following fields exist in the response
    res = response.json()
    for f in ["version", "name", "labels"]:
        assert res[f]


def test_monailabel_integration_infer(served):
    url, headers = served["server"].url, served["server"].headers
    model = MODEL
    for image in ("cxr_covid", "ct_upload"):
        response = requests.post(f"{url}/infer/{model}?image={image}", headers=headers)
        assert response.status_code == 200, response.text
    # their params-carrying request (the deepgrow one): params as a JSON form field
    image, params = "ct_upload", {"slice": 1, **SHORT}
    response = requests.post(f"{url}/infer/{model}?image={image}", data={"params": json.dumps(params)}, headers=headers)
    assert response.status_code == 200, response.text


def test_monailabel_integration_trainer(served):
    url, headers = served["server"].url, served["server"].headers
    params = {
        "model": MODEL,
        "max_epochs": 1,
        "name": "net_test_raddiagseg_trainer_01",
        "val_split": 0.5,
        "multi_gpu": False,
    }

    response = requests.post(f"{url}/train/{MODEL}?run_sync=True", json=params, headers=headers)
    assert response.status_code == 200, response.text
