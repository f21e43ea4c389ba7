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
    image, label, phantom = ct_phantom_image(seed=11, size=64, slices=8, tumours=1)
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
    store, image, label, label_path = datastore
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
