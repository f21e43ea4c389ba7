"""The train task's dataset: corrected labels + label info in a real MONAI Label datastore → manifest rows."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from app_studies import ct_phantom_image

pytest.importorskip("raddiagseg.answers")
pytest.importorskip("raddiagseg.data.io")
from monailabel.datastore.local import LocalDatastore

from raddiagseg import templates
from raddiagseg.data.io import read_slice

from lib import image_io, training_data


@pytest.fixture
def datastore(tmp_path):
    image, label, _ = ct_phantom_image(seed=11, size=64, slices=8, tumours=1)
    studies = tmp_path / "studies"
    studies.mkdir()
    sitk.WriteImage(image, str(studies / "ct.nii.gz"))
    label_path = tmp_path / "ct_label.nii.gz"
    sitk.WriteImage(label, str(label_path))
    store = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    return store, image, label, label_path


def read_rows(summary):
    with open(summary["manifest"]) as handle:
        return [json.loads(line) for line in handle]


def test_corrected_slice_gives_vqaseg_with_the_corrected_diagnosis_and_refseg_per_segment(datastore, tmp_path):
    store, image, label, label_path = datastore
    labels = sitk.GetArrayFromImage(label)
    k = int(np.argmax([(labels[i] == 2).sum() for i in range(labels.shape[0])]))  # slice with most tumour
    info = {"segments": [{"name": "liver", "label_value": 1}, {"name": "tumour", "label_value": 2}],
            "detection": True, "diagnosis": "Pancreas tumour", "slice": k}
    store.save_label("ct", str(label_path), "final", info)
    summary = training_data.build(store, tmp_path / "data")
    rows = read_rows(summary)
    train = [r for r in rows if r["split"] == "train"]
    vqaseg = [r for r in train if r["task"] == "vqaseg"]
    assert len(vqaseg) == 1 and summary["val_on_train"]
    # "tumour" resolves through the corrected diagnosis
    assert vqaseg[0]["answer"] == templates.vqaseg_answer(True, "Pancreas tumour", ["liver", "pancreas tumour"])
    assert vqaseg[0]["slice"] == k
    assert {r["targets"][0]["name"] for r in train if r["task"] == "refseg"} == {"liver", "pancreas tumour"}
    # the written mask is the label's slice k, in the model's view of the volume
    view = image_io.VolumeView.of(image)
    expected = view.to_view(labels)[view.view_index(k, labels.shape[0])] == 2
    mask = read_slice(tmp_path / "data" / vqaseg[0]["targets"][1]["mask"])
    assert np.array_equal(mask.astype(bool), expected)
    picture = read_slice(tmp_path / "data" / vqaseg[0]["image"])
    assert picture.shape == expected.shape


def test_volume_label_without_slice_gives_positive_and_negative_slices(datastore, tmp_path):
    store, _, label, label_path = datastore
    labels = sitk.GetArrayFromImage(label)
    info = {"label_names": {"liver": 1, "liver tumour": 2}, "answer": "1. Yes\n2. Liver tumour"}
    store.save_label("ct", str(label_path), "final", info)
    rows = [r for r in read_rows(training_data.build(store, tmp_path / "data")) if r["split"] == "train"]
    vqaseg = {r["slice"]: r for r in rows if r["task"] == "vqaseg"}
    labelled = {k for k in range(labels.shape[0]) if labels[k].any()}
    assert set(vqaseg) == labelled
    for k, row in vqaseg.items():
        has_tumour = bool((labels[k] == 2).any())
        assert row["detection"] == has_tumour
        assert row["answer"] == (templates.vqaseg_answer(True, "Liver tumour", ["liver", "liver tumour"])
                                 if has_tumour else templates.NEGATIVE_ANSWER)


def test_labels_without_names_are_skipped_with_a_reason(datastore, tmp_path):
    store, _, _, label_path = datastore
    store.save_label("ct", str(label_path), "final", {})
    summary = training_data.build(store, tmp_path / "data")
    assert summary["train_samples"] == 0
    assert "names no segments" in summary["skipped"][0]["reason"]


def add_ct(store, tmp_path, image_id, image):
    path = tmp_path / f"{image_id}.nii.gz"
    sitk.WriteImage(image, str(path))
    store.add_image(image_id, str(path), {})


STOCK_INFO = {"label_info": [{"name": "liver", "idx": 1}, {"name": "liver tumour", "idx": 2}], "model": "raddiagseg"}


def test_stock_plugin_label_info_maps_to_the_vocabulary(datastore, tmp_path):
    """The stock MONAI Label Slicer plugin's format trains like ours: names, implied diagnosis, every labelled slice."""
    store, _, label, label_path = datastore
    labels = sitk.GetArrayFromImage(label)
    store.save_label("ct", str(label_path), "final", STOCK_INFO)
    summary = training_data.build(store, tmp_path / "data")
    assert summary["images"] == 1 and summary["skipped"] == [] and summary["skipped_segments"] == []
    train = [r for r in read_rows(summary) if r["split"] == "train"]
    vqaseg = {r["slice"]: r for r in train if r["task"] == "vqaseg"}
    assert set(vqaseg) == {k for k in range(labels.shape[0]) if labels[k].any()}
    tumour_slices = {k for k in vqaseg if (labels[k] == 2).any()}
    assert tumour_slices and all(vqaseg[k]["diagnosis"] == "Liver tumour" for k in tumour_slices)
    assert {r["targets"][0]["name"] for r in train if r["task"] == "refseg"} == {"liver", "liver tumour"}


def test_stock_names_synonyms_and_shared_synonym_resolved_by_the_organ():
    from lib import label_info

    info = label_info.parse({"label_info": [{"name": "Hepatic organ"}, {"name": "Tumor"}]})  # no idx: position + 1
    assert info.segments == [("liver", 1, "organ"), ("liver tumour", 2, "abnormality")]
    assert info.diagnosis == "Liver tumour" and info.unknown == []
    alone = label_info.parse({"label_info": [{"name": "tumour", "idx": 3}]})  # liver or pancreas: unknown
    assert alone.segments == [] and alone.unknown == [("tumour", 3)]
    lung = label_info.parse({"label_info": [{"name": "lungs", "idx": 1}, {"name": "opacity", "idx": 2}]})
    assert lung.diagnosis == "COVID-19 infection"
    with pytest.raises(label_info.LabelInfoError, match="label_info"):
        label_info.parse({"label_info": [{"idx": 1}]})
    with pytest.raises(label_info.LabelInfoError, match="same target"):
        label_info.parse({"label_names": {"liver": 1, "hepatic organ": 2}})


def test_unknown_name_is_left_out_of_training_with_a_reason(datastore, tmp_path):
    store, _, _, label_path = datastore
    from lib import label_info

    info = {"label_info": [{"name": "liver", "idx": 1}, {"name": "Segment_2", "idx": 2}]}
    assert "Segment_2" in label_info.validate(info)[0]
    store.save_label("ct", str(label_path), "final", info)
    summary = training_data.build(store, tmp_path / "data")
    assert summary["skipped"] == []
    [entry] = summary["skipped_segments"]
    assert entry["image"] == "ct" and entry["segment"] == "Segment_2" and entry["label_value"] == 2
    assert "not a target RadDiag knows" in entry["reason"] and "liver tumour" in entry["reason"]
    rows = [r for r in read_rows(summary) if r["split"] == "train"]
    assert rows and {t["name"] for r in rows for t in r["targets"]} == {"liver"}
    assert all(r["detection"] is False for r in rows if r["task"] == "vqaseg")  # no known abnormality was named


@pytest.mark.parametrize("problem, reason", [
    ("question", "question must be non-empty text"),
    ("unreadable", "could not be read"),
    ("size", "differs from image size"),
    ("unknown only", "no segment name RadDiag knows"),
])
def test_one_bad_label_is_skipped_with_its_reason_and_the_rest_is_used(datastore, tmp_path, problem, reason):
    store, image, _, label_path = datastore
    store.save_label("ct", str(label_path), "final", STOCK_INFO)
    add_ct(store, tmp_path, "ct_bad", image)
    info, bad_label = dict(STOCK_INFO), label_path
    if problem == "question":
        info["question"] = 5
    elif problem == "unreadable":
        bad_label = tmp_path / "broken.nii.gz"
        bad_label.write_bytes(b"not a nifti file")
    elif problem == "size":
        bad_label = tmp_path / "small.nii.gz"
        sitk.WriteImage(sitk.Image([8, 8, 2], sitk.sitkUInt8), str(bad_label))
    else:
        info = {"label_info": [{"name": "Segment_1", "idx": 1}, {"name": "Segment_2", "idx": 2}]}
    store.save_label("ct_bad", str(bad_label), "final", info)
    summary = training_data.build(store, tmp_path / "data")
    assert [s["image"] for s in summary["skipped"]] == ["ct_bad"]
    assert reason in summary["skipped"][0]["reason"], summary["skipped"]
    rows = read_rows(summary)
    assert summary["images"] == 1 and rows and {r["volume"] for r in rows} == {"ct"}
    assert all(isinstance(r["question"], str) for r in rows)


def test_an_image_of_a_modality_radiag_does_not_train_on_is_skipped_unless_label_info_names_one(datastore, tmp_path):
    """Issue 21: a real ultrasound (pydicom-data's US1_UNCI.dcm, DICOM Modality US) is not turned into X-ray
    training rows behind the user's back; label info `modality` says what to train it as."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("US1_UNCI.dcm")
    if path is None:
        pytest.skip("pydicom-data is not installed")
    store, _, _, _ = datastore
    store.add_image("us", path, {})
    image = image_io.read_image(path)
    label = np.zeros(tuple(reversed(image.GetSize())), np.uint8)
    label[..., 40:80, 60:120] = 1
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(image)
    sitk.WriteImage(label_image, str(tmp_path / "us_label.nii.gz"))
    store.save_label("us", str(tmp_path / "us_label.nii.gz"), "final", {"label_info": [{"name": "lung", "idx": 1}]})
    summary = training_data.build(store, tmp_path / "data")
    assert [s["image"] for s in summary["skipped"]] == ["us"]
    assert "the image is US (its DICOM Modality)" in summary["skipped"][0]["reason"] and \
        "label info modality" in summary["skipped"][0]["reason"]
    store.save_label("us", str(tmp_path / "us_label.nii.gz"), "final",
                     {"label_info": [{"name": "lung", "idx": 1}], "modality": "xray"})
    summary = training_data.build(store, tmp_path / "again")
    rows = [r for r in read_rows(summary) if r["volume"] == "us"]
    assert summary["skipped"] == [] and rows and {r["modality"] for r in rows} == {"xray"}
