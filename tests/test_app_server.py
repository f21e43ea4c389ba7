"""Integration tests of the MONAI Label app against a real `monailabel start_server` on 127.0.0.1.

A randomly initialised demo-preset model is served (its answers are gibberish, but geometry,
JSON shape, label files, caching and errors are all real); behaviour that needs real answers
is in test_app_demo_model.py and runs when the trained demo model is shipped.
"""


import numpy as np
import pytest
import requests
import SimpleITK as sitk
from app_server import infer_with_label
from app_studies import assert_same_geometry, assert_volume_answer_consistent

requests_toolbelt = pytest.importorskip("requests_toolbelt.multipart.decoder")


@pytest.fixture(scope="module")
def served(app_server):
    return app_server("app", model="random")


def infer(server, image_id, params=None, tmp_path=None, expect=200):
    params = {"max_new_tokens": 16, **(params or {})}  # random weights never stop early: keep answers short
    return infer_with_label(server, image_id, params, tmp_path, expect)


def assert_response_shape(result):
    from lib.infer_response import DomainVerdict, InferResponse, Modality, Segment

    assert set(InferResponse.__annotations__) == set(result), set(InferResponse.__annotations__) ^ set(result)
    assert set(Modality.__annotations__) == set(result["modality"]), result["modality"]
    assert set(DomainVerdict.__annotations__) <= set(result["domain"]), result["domain"]
    assert all(set(Segment.__annotations__) <= set(segment) for segment in result["segments"]), result["segments"]
    values = [s["label_value"] for s in result["segments"]]
    assert values == list(range(1, len(values) + 1))
    assert result["label_names"] == {s["name"]: s["label_value"] for s in result["segments"]}
    for segment in result["segments"]:
        assert len(segment["color"]) == 3 and segment["role"] in ("organ", "abnormality", "unknown")


def test_info_lists_model_trainer_strategies_and_labels(served):
    info = requests.get(served["server"].url + "/info/", timeout=10).json()
    assert "raddiagseg" in info["models"] and "raddiagseg" in info["trainers"]
    assert {"uncertain", "random", "first"} <= set(info["strategies"])
    for name in ("liver", "liver tumour", "pancreas", "pancreas tumour", "lung", "infection"):
        assert name in info["models"]["raddiagseg"]["labels"]
        assert name in info["labels"]


def test_ct_slice_label_has_input_geometry_and_only_that_slice(served, tmp_path):
    image = served["studies"]["ct_liver"][0]
    result, label_path = infer(served["server"], "ct_liver", {"slice": 4}, tmp_path)
    assert_response_shape(result)
    assert [s["slice"] for s in result["slices"]] == [4] and result["volume"] is None
    assert result["modality"]["value"] == "ct"
    labels = assert_same_geometry(label_path, image)
    assert labels.max() <= len(result["segments"])
    outside = np.delete(labels, 4, axis=0)  # k = 4 is numpy axis 0 of the (K, J, I) array
    assert not outside.any()


def test_second_question_on_same_slice_reuses_image_features(served, tmp_path):
    first, _ = infer(served["server"], "ct_liver", {"slice": 7}, tmp_path)
    second, _ = infer(served["server"], "ct_liver", {"slice": 7, "question": "Please segment liver in the CT scan."}, tmp_path)
    assert first["feature_cache"]["encoded"] == 1
    assert second["feature_cache"]["encoded"] == 0 and second["feature_cache"]["cached"] == 1
    assert second["feature_cache"]["hits"] > first["feature_cache"]["hits"]
    assert second["image_cache"]["hits"] > first["image_cache"]["hits"]  # the file was not decoded again


def test_whole_volume_answers_every_slice_in_file_order(served, tmp_path):
    image = served["studies"]["ct_liver"][0]
    result, label_path = infer(served["server"], "ct_liver", {"batch_size": 4, "max_new_tokens": 24, "skip_slices": False},
                               tmp_path)
    assert_response_shape(result)
    n = image.GetSize()[2]
    assert [s["slice"] for s in result["slices"]] == list(range(n))
    assert result["volume"]["n_slices"] == n and result["volume"]["skipped_slices"] == []
    assert isinstance(result["findings"], list) and isinstance(result["volume"]["discarded"], list)
    if result["detection"]:
        assert result["volume"]["positive_slices"]
    assert_same_geometry(label_path, image)
    assert_volume_answer_consistent(result, label_path, image)


def test_xray_png_gives_2d_label_of_the_same_size(served, tmp_path):
    result, label_path = infer(served["server"], "cxr_covid", {}, tmp_path)
    assert_response_shape(result)
    assert result["modality"]["value"] == "xray" and result["slices"] == []
    label = sitk.ReadImage(str(label_path))
    assert label.GetSize()[:2] == served["studies"]["cxr_covid"][0].shape[::-1]


def test_test_time_scaling_reports_agreement(served, tmp_path):
    plain, _ = infer(served["server"], "cxr_covid", {"max_new_tokens": 12}, tmp_path)
    assert plain["agreement"] is None
    result, label_path = infer(served["server"], "cxr_covid", {"tts": True, "max_new_tokens": 12}, tmp_path)
    assert_response_shape(result)
    agreement = result["agreement"]
    assert agreement["paths"] == 4 and 0.0 < agreement["answer"] <= 1.0  # greedy + 3 sampled answers
    assert all(0.0 <= m <= 1.0 for m in agreement["masks"])  # one consensus IoU per seg token of the chosen answer
    ct, _ = infer(served["server"], "ct_liver", {"tts": True, "slice": 3, "max_new_tokens": 12}, tmp_path)
    assert ct["slices"][0]["agreement"]["paths"] == 4 and ct["agreement"] == ct["slices"][0]["agreement"]


def test_model_options_reach_the_model(served, tmp_path):
    """Issue 10 options as infer params: tts_answers x tts_masks, rvls2m on/off, cot (echoed under "options")."""
    result, _ = infer(served["server"], "cxr_covid", {"tts": True, "tts_answers": 2, "tts_masks": 3, "rvls2m": "on",
                                                      "max_new_tokens": 8}, tmp_path)
    assert result["agreement"]["paths"] == 2 and result["agreement"]["masks_per_path"] == 3
    assert 0.0 <= result["agreement"]["uncertainty"] <= 1.0
    assert result["options"] == {"tts": {"num_answers": 2, "num_masks": 3, "rvls2m": True}, "rvls2m": True, "cot": False}
    result, _ = infer(served["server"], "ct_liver", {"slice": 1, "cot": True, "rvls2m": False, "max_new_tokens": 8}, tmp_path)
    assert_response_shape(result)
    assert result["options"] == {"tts": None, "rvls2m": False, "cot": True}
    body, _ = infer(served["server"], "ct_liver", {"tts_answers": 99}, expect=400)
    assert "tts_answers" in body["detail"]


def test_seg_nrrd_result_reads_back_with_slicerio(served, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    result, path = infer(served["server"], "ct_liver", {"slice": 2, "result_extension": ".seg.nrrd"}, tmp_path)
    segmentation = slicerio.read_segmentation(str(path))
    assert slicerio.segment_names(segmentation) == [s["name"] for s in result["segments"]]
    image = served["studies"]["ct_liver"][0]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert np.allclose(segmentation["ijkToLPS"][:3, :3], direction @ np.diag(image.GetSpacing()))
    assert np.allclose(segmentation["ijkToLPS"][:3, 3], image.GetOrigin())


@pytest.mark.parametrize(
    "params, message",
    [
        ({"slice": 99}, "outside the volume"),
        ({"result_extension": ".exe"}, "result_extension"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"question": "x" * 5000}, "too long"),
        ({"modality": "pet"}, "modality"),
        ({"rvls2m": "maybe"}, "rvls2m"),
        ({"cot": "often"}, "cot"),
    ],
)
def test_bad_parameters_are_4xx_with_a_message(served, params, message):
    body, _ = infer(served["server"], "ct_liver", params, expect=400)
    assert message in body["detail"]
    assert requests.get(served["server"].url + "/info/", timeout=10).status_code == 200


def test_uncertain_strategy_scores_and_caches_in_image_info(served):
    url = served["server"].url
    reply = requests.post(url + "/activelearning/uncertain", json={"max_new_tokens": 12}, timeout=300)
    assert reply.status_code == 200, reply.text
    chosen = reply.json()
    assert chosen["id"] in ("ct_liver", "cxr_covid") and 0.0 <= chosen["score"] <= 1.0
    datastore = requests.get(url + "/datastore/?output=all", timeout=10).json()
    infos = {k: v["image"]["info"] for k, v in datastore["objects"].items()}
    assert all("raddiag_uncertainty" in info for info in infos.values())
    refused = requests.post(url + "/activelearning/uncertain", json={"max_new_tokens": 0}, timeout=30)
    assert refused.status_code == 400 and "max_new_tokens" in refused.json()["detail"]
    for strategy in ("random", "first"):
        assert requests.post(f"{url}/activelearning/{strategy}", json={}, timeout=30).json()["id"] in infos
