"""Acceptance: RadDiagLib drives a live RadDiag MONAI Label server through the clinician's journey
(ask, review, correct, retrain) without Slicer: ask -> segments -> change a mask -> submit with an edited
diagnosis -> retrain -> the new answer.

Two servers: one with a randomly initialised demo-preset model (answers are gibberish, but every
request, file, geometry and the training round trip are real), and, when the trained demo model
is shipped in MONAILabelApp/model/raddiagseg-demo, one with it, where the answers must make sense.
"""

import shutil
import time

import numpy as np
import pytest
import requests

from RadDiagLib import DEFAULT_QUESTION, RadDiagClient, SegmentSpec, ServerError, export_order
from RadDiagLib.workflow import diagnose, image_id_for, retrain, submit_correction

sitk = pytest.importorskip("SimpleITK")
app_studies = pytest.importorskip("app_studies")
vocabulary = pytest.importorskip("raddiagseg.vocabulary")

if not (app_studies.APP_DIR / "main.py").exists():
    pytest.skip("the MONAI Label app (MONAILabelApp/main.py) is not there yet", allow_module_level=True)

MODEL = "raddiagseg"
TRAIN_TIMEOUT_S = 600
TRAIN_STEPS = 1  # the app's train task costs minutes on 2 shared cores (app start, data, 2 evaluations) even so
# one gate check on 40 reference rows: the journey shows training and its verdict; the gate itself is tested in
# test_app_train.py and test_app_retrain_gate.py
TRAIN_PARAMS = {"max_steps": TRAIN_STEPS, "blend_tries": 1, "val_max_samples": 40}


def vocabulary_spec(name, label_value):
    entry = vocabulary.targets()[name]
    return SegmentSpec(name, label_value, entry["role"], entry["color"])


def axial_slice_with(label_image, value):
    """(axis-aligned file index k of a slice containing label `value`, label array [k, j, i])."""
    array = sitk.GetArrayFromImage(label_image)
    direction = np.array(label_image.GetDirection()).reshape(3, 3)
    axis = int(np.argmax(np.abs(direction[2, :])))  # index axis i/j/k running along S
    numpy_axis = 2 - axis
    counts = (array == value).sum(axis=tuple(a for a in range(3) if a != numpy_axis))
    return axis, int(np.argmax(counts)), array


def corrected_label(image, truth_array, axis, index, specs):
    """The correction a clinician would draw: ground-truth masks on the asked slice, values in export order."""
    ordered = export_order(specs)
    labels = np.zeros_like(truth_array, dtype=np.uint8)
    selector = [slice(None)] * 3
    selector[2 - axis] = index
    source = truth_array[tuple(selector)]
    target = labels[tuple(selector)]
    truth_value = {"liver": 1, "liver tumour": 2}  # the phantom generator's label values
    for position, spec in enumerate(ordered, start=1):
        target[source == truth_value[spec.name]] = position  # later (abnormality) wins on overlap
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    return out


def assert_geometry(label_path, image):
    label = sitk.ReadImage(str(label_path))
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetSpacing(), image.GetSpacing())
    assert np.allclose(label.GetOrigin(), image.GetOrigin())
    assert np.allclose(label.GetDirection(), image.GetDirection())


def assert_segments_consistent(result, info):
    names = set(info["models"][MODEL]["labels"])
    for spec in result.specs:
        assert spec.name in names, spec.name
        entry = vocabulary.targets().get(spec.name)
        if entry:
            assert spec.color == tuple(entry["color"])
            assert spec.role == entry["role"]
            assert entry["terminology"]["type"][1] in spec.terminology
    assert result.present <= {s.label_value for s in result.specs}
    assert {s.label_value for s in result.empty} == {s.label_value for s in result.specs} - result.present


def journey(server, tmp_path, image, truth, diagnosis, train=True):
    """Run the journey against `server`; returns (first result, training progress, last result, label info).

    With train=False it stops after the submitted correction (progress and last result are None).
    """
    client = RadDiagClient(server.url, timeout=(5, 300))
    info = client.info()
    assert MODEL in client.models(info)

    # the clinician's own volume: not in the datastore yet, so it is uploaded (once)
    volume_path = str(tmp_path / "patient ct.nrrd")
    sitk.WriteImage(image, volume_path, True)
    image_id = image_id_for("patient ct", volume_path)
    axis, k, truth_array = axial_slice_with(truth, 2)
    first = diagnose(client, MODEL, volume_path, image_id, DEFAULT_QUESTION, slice_index=k,
                     result_dir=str(tmp_path / "r1"))
    assert client.image_exists(image_id)
    assert first.params["slices"][0]["slice"] == k
    assert isinstance(first.answer, str) and first.answer
    assert first.label_path
    assert_geometry(first.label_path, image)
    assert_segments_consistent(first, info)

    # change the masks (liver + tumour from the phantom's truth) and edit the diagnosis
    specs = [vocabulary_spec("liver tumour", 1), vocabulary_spec("liver", 2)]
    correction = corrected_label(image, truth_array, axis, k, specs)
    correction_path = str(tmp_path / "correction.nii.gz")
    sitk.WriteImage(correction, correction_path, True)
    label_info, _ = submit_correction(client, image_id, correction_path, specs, True, diagnosis, slice_index=k,
                                      model=MODEL)
    assert label_info["label_names"] == {"liver": 1, "liver tumour": 2}  # organ first, whatever the spec order
    stored = requests.get(f"{server.url}/datastore/label/info", params={"label": image_id, "tag": "final"},
                          timeout=10).json()
    assert stored["diagnosis"] == diagnosis and stored["label_names"] == label_info["label_names"]

    if not train:
        return first, None, None, label_info

    # retrain on it and follow the progress to the end
    seen = []

    class Context:
        def progress(self, fraction, message):
            seen.append((fraction, message))

        def wait(self, seconds):
            time.sleep(seconds)

    progress = retrain(client, MODEL, context=Context(), poll_s=1.0, params=TRAIN_PARAMS,
                       timeout_s=TRAIN_TIMEOUT_S)
    assert progress.state == "done", f"{progress.message}\n{server.log()}"
    assert seen and all(m for _, m in seen)
    stats = client.train_stats(MODEL)
    assert stats.get("step") == TRAIN_STEPS and stats.get("published") == progress.published

    # the new answer, from the model that is live now
    last = diagnose(client, MODEL, volume_path, image_id, DEFAULT_QUESTION, slice_index=k,
                    result_dir=str(tmp_path / "r2"))
    if progress.published:
        assert last.params["model"]["version"] != first.params["model"]["version"]
    else:
        assert last.params["model"]["version"] == first.params["model"]["version"]
    assert_geometry(last.label_path, image)
    assert_segments_consistent(last, info)
    return first, progress, last, label_info


def demo_model_present():
    return (app_studies.DEMO_MODEL / "config.json").exists()


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("slicer_journey")
    app_studies.write_studies(root / "studies")
    image, truth, _ = app_studies.ct_phantom_image(seed=11, size=64, slices=8, task="liver", tumours=1)
    return root, image, truth


def test_journey_random_model(server_factory, studies, tmp_path):
    root, image, truth = studies
    model_dir = app_studies.random_model_dir(root / "random-model")
    server = server_factory(app_studies.APP_DIR, root / "studies", {"model_path": model_dir, "work_dir": root / "work"})
    # the full round trip (with training) runs once: here, unless the demo-model journey below runs it
    first, progress, last, info = journey(server, tmp_path, image, truth, "Liver tumour", train=not demo_model_present())
    assert info["answer"].startswith("1. Yes\n2. Liver tumour\n3. Segmentation masks:\n- liver <seg000>")
    # errors a user can act on, from the real server
    client = RadDiagClient(server.url)
    with pytest.raises(ServerError) as err:
        client.infer(MODEL, image_id=first.image_id, params={"slice": 999})
    assert err.value.status == 400 and "outside the volume" in str(err.value)


def test_journey_demo_model(server_factory, studies, tmp_path):
    if not demo_model_present():
        pytest.skip(f"the trained demo model is not shipped yet ({app_studies.DEMO_MODEL} has no config.json)")
    root, image, truth = studies
    model_dir = root / "demo-model"
    shutil.copytree(app_studies.DEMO_MODEL, model_dir)
    server = server_factory(app_studies.APP_DIR, root / "studies", {"model_path": model_dir,
                                                                    "work_dir": root / "work-demo"})
    first, progress, last, _ = journey(server, tmp_path, image, truth, "Liver tumour")
    # a trained model sees the tumour phantom and names its segments
    assert first.detection is True
    assert {"liver", "liver tumour"} <= {s.name for s in first.specs}
    assert last.detection is True and last.diagnosis == "Liver tumour"
