"""Issue 21: the shipped demo model (synthetic phantoms only) refuses real images, answers unseen phantoms, and never
names a diagnosis of another modality; every answer says which model answered and that it is not for clinical use.

Real images are files that packages ship (pydicom, pydicom-data, nibabel, scikit-image), asked through the app's real
infer task (`RadDiagSegInfer` with its model store, runner and feature cache, as the server builds it)."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from app_studies import DEMO_MODEL

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "domain_stats.safetensors").is_file(),
                                reason="the demo model folder has no domain statistics")


def _pydicom_file(name):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return path


@pytest.fixture(scope="module")
def infer(tmp_path_factory):
    """Callable(path, **params) -> the infer task's JSON result (the label file is removed); `.task` is the task."""
    from domain_guard import app_infer  # benchmarks/domain_guard.py

    return app_infer(tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def real_images(tmp_path_factory):
    import nibabel.testing
    import skimage.data
    from PIL import Image

    folder = tmp_path_factory.mktemp("real")
    Image.fromarray(skimage.data.camera()).save(folder / "camera.png")
    Image.fromarray(skimage.data.retina()).save(folder / "retina.png")
    return {
        "neck CT (CT_small.dcm)": _pydicom_file("CT_small.dcm"),
        "MR (MR_small.dcm)": _pydicom_file("MR_small.dcm"),
        "head CT (693_UNCI.dcm)": _pydicom_file("693_UNCI.dcm"),
        "chest CR (RG1_UNCI.dcm)": _pydicom_file("RG1_UNCI.dcm"),
        "MR volume (nibabel anatomical.nii)": str(Path(nibabel.testing.data_path) / "anatomical.nii"),
        "camera photo": str(folder / "camera.png"),
        "retina photo": str(folder / "retina.png"),
    }


def assert_refused(result, what):
    domain = result["domain"]
    assert domain["in_domain"] is False, (what, domain)
    assert result["detection"] is None and result["diagnosis"] is None, (what, result["answer"])
    assert result["segments"] == [] and result["label_names"] == {}, what
    assert result["answer"].startswith("Not answered: this image is outside what the model raddiagseg-demo was "
                                       "trained on: synthetic phantoms only"), result["answer"]
    assert domain["reason"] in result["answer"]


def test_real_package_images_are_refused_with_no_diagnosis(infer, real_images):
    for what, path in real_images.items():
        result = infer(path)
        assert_refused(result, what)
        if "slices_checked" in result["domain"]:  # a whole volume: every checked slice out of domain
            assert result["domain"]["score"] == 0.0, (what, result["domain"])
            assert all(s["domain"]["in_domain"] is False for s in result["slices"]), (what, result["slices"])
        elif result["domain"]["score"] is not None:  # scored (not refused for its modality alone): by a clear margin
            assert result["domain"]["score"] > 1.5 * result["domain"]["threshold"], (what, result["domain"])


def test_modality_is_returned_with_how_it_was_inferred(infer, real_images, tmp_path):
    assert infer(real_images["MR (MR_small.dcm)"])["modality"] == {"value": "mri", "source": "dicom"}
    mr = infer(real_images["MR (MR_small.dcm)"])["domain"]["reason"]
    assert "MR (from the DICOM header)" in mr and "trained on CT and chest X-ray images only" in mr, mr
    assert infer(real_images["camera photo"])["modality"] == {"value": "xray", "source": "intensities"}
    # read as CT because the request says so (with a window in the file's units: 0..255 cannot be HU)
    as_ct = infer(real_images["camera photo"], modality="ct", window=[128, 256])
    assert as_ct["modality"] == {"value": "ct", "source": "param"} and as_ct["domain"]["in_domain"] is False


def _phantom_xray(tmp_path, seed, kind="COVID-19"):
    from raddiagseg.data.phantoms import generate_xray

    path = tmp_path / f"xray_{seed}.png"
    sitk.WriteImage(sitk.GetImageFromArray(generate_xray(np.random.default_rng(seed), kind, size=256).image), str(path))
    return path


def test_force_answers_and_stays_flagged(infer, real_images):
    result = infer(real_images["camera photo"], force=True)
    assert result["domain"]["in_domain"] is False
    assert result["answer"] and not result["answer"].startswith("Not answered"), result["answer"]
    assert result["detection"] is not None, result["answer"]
    for segment in result["segments"]:  # forced on an X-ray-looking image: still nothing of a CT
        assert segment["name"] in ("lung", "infection"), result["segments"]


def test_unseen_phantoms_are_in_domain_and_answered(infer, tmp_path):
    """Phantoms of seeds the model never trained on (training: 1234; calibration: 2718) through the app."""
    from raddiagseg.data.phantoms import generate_ct

    for seed in (4001, 4002, 4003):
        result = infer(_phantom_xray(tmp_path, seed))
        assert result["domain"]["in_domain"] is True, result["domain"]
        assert not result["answer"].startswith("Not answered"), result["answer"]
    phantom = generate_ct(np.random.default_rng(4004), "liver", slices=12)
    volume = sitk.GetImageFromArray(phantom.hu.astype(np.int16))
    dz, dr, dc = phantom.spacing
    volume.SetSpacing((float(dc), float(dr), float(dz)))
    sitk.WriteImage(volume, str(tmp_path / "ct.nii.gz"))
    result = infer(tmp_path / "ct.nii.gz")
    assert result["domain"]["in_domain"] is True and result["domain"]["slices_checked"] >= 6, result["domain"]
    assert result["domain"]["score"] >= 0.9, result["domain"]
    assert all(s["domain"]["in_domain"] for s in result["slices"]), [s["domain"] for s in result["slices"]]
    assert result["detection"] is not None, result["answer"]


def test_every_answer_names_the_model_and_says_not_for_clinical_use(infer, tmp_path):
    result = infer(_phantom_xray(tmp_path, 4005))
    model = result["model"]
    assert model["name"] == "raddiagseg-demo" and model["trained_on"].startswith("synthetic phantoms only"), model
    assert model["clinical_use"] is False and model["notice"].startswith(
        "Answered by raddiagseg-demo: trained on synthetic phantoms only") and "not for clinical use" in model["notice"]
    info = infer.task.info()["model"]
    keys = ("name", "trained_on", "clinical_use", "notice")
    assert {k: info[k] for k in keys} == {k: model[k] for k in keys}


def test_no_xray_answer_names_a_ct_only_diagnosis(infer, real_images, tmp_path):
    """Forced answers on X-ray-read images and phantom X-rays: never a CT diagnosis, never a CT-only target."""
    from raddiagseg import findings

    paths = [real_images["chest CR (RG1_UNCI.dcm)"], real_images["retina photo"], real_images["camera photo"]]
    paths += [_phantom_xray(tmp_path, seed, kind) for seed, kind in ((4010, "Normal"), (4011, "Non-COVID"))]
    for path in paths:
        result = infer(path, force=True)
        assert result["modality"]["value"] == "xray"
        entry = findings.diagnosis_entry(result["diagnosis"])
        assert entry is None or entry["modality"] == "xray", result["answer"]
        assert all("xray" in findings.target_modalities(s["name"]) for s in result["segments"]), result["segments"]


def test_an_answer_of_the_other_modality_is_withheld():
    """The rule itself, on answers the demo model may rarely give: a CT diagnosis on an X-ray withholds the answer
    and its masks; a CT target beside an X-ray diagnosis loses its mask and its line."""
    from raddiagseg.answers import parse_answer
    from raddiagseg.findings import restrict_to_modality
    from raddiagseg.model.outputs import GenerationResult, SegmentResult

    mask = np.ones((4, 4), bool)
    ct_answer = GenerationResult("1. Yes\n2. Pancreas tumour\n3. Segmentation masks:\n- pancreas <seg000>\n- tumour <seg001>",
                                 [SegmentResult("pancreas", "<seg000>", mask, 0.9), SegmentResult("tumour", "<seg001>", mask, 0.9)], {})
    kept, note = restrict_to_modality(ct_answer, "xray")
    assert kept.segments == [] and parse_answer(kept.answer).detection is None and "Pancreas tumour" in note
    assert restrict_to_modality(ct_answer, "ct")[0] is ct_answer
    mixed = GenerationResult("1. Yes\n2. COVID-19 infection\n3. Segmentation masks:\n- lung <seg000>\n- liver <seg001>",
                             [SegmentResult("lung", "<seg000>", mask, 0.9), SegmentResult("liver", "<seg001>", mask, 0.9)], {})
    kept, note = restrict_to_modality(mixed, "xray")
    assert [s.label for s in kept.segments] == ["lung"] and "<seg001>" not in kept.answer
    assert parse_answer(kept.answer).diagnosis == "COVID-19 infection" and "liver" in note


def test_slicer_answer_panel_says_which_model_answered_and_why_it_refused(infer, real_images):
    from RadDiagLib import answer_html

    result = infer(real_images["camera photo"])
    text = answer_html(result)
    assert "Answered by raddiagseg-demo: trained on synthetic phantoms only" in text and "not for clinical use" in text
    assert "This image is outside what the model was trained on: the image is unlike the model&#x27;s chest X-ray " \
           "training images" in text and "No diagnosis was given." in text and "No diagnosis given" in text


# --- every image file that the installed packages ship -----------------------------------------------------------
def test_every_image_file_the_packages_ship_is_refused_or_rejected_with_a_4xx(infer):
    """No real file gets a diagnosis: each is read and refused (out of domain, no detection, diagnosis or segments)
    or rejected with a 4xx saying why; never a 5xx or another exception. A DICOM's own Modality is what it is read
    as (an ultrasound is not an X-ray, a DICOM SEG or an RT dose grid is not a CT)."""
    from domain_guard import dicom_tag, outcome, package_files

    files = package_files()
    by_package = {p: sum(name.startswith(p) for name, _ in files) for p in ("pydicom/", "data_store/", "nibabel/", "skimage/")}
    assert all(by_package.values()), by_package  # .ci/run installs them all
    wrong, refused, rejected = [], [], []
    for name, path in files:
        kind, detail = outcome(infer, path)
        if kind == "rejected":
            rejected.append(name)
            continue
        if kind != "refused":
            wrong.append((name, kind, str(detail)[:300]))
            continue
        refused.append(name)
        tag = dicom_tag(path) if name.endswith(".dcm") else ""
        expected = {"CT": "ct", "MR": "mri", "CR": "xray", "DX": "xray"}.get(tag, tag.lower())
        if tag and detail["modality"] != {"value": expected, "source": "dicom"}:
            wrong.append((name, tag, detail["modality"]))
    assert not wrong, "\n".join(map(str, wrong))
    # the files that are images are read, not turned away: CT, MR, CR, US, NM, OT, SEG, RTDOSE, photos, NIfTI volumes
    for family in ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "RG1_UNCI.dcm", "US1_UNCI.dcm", "JPEG2000_UNC.dcm",
                   "SC_rgb.dcm", "liver.dcm", "rtdose.dcm", "anatomical.nii", "camera.png", "retina.jpg",
                   "chessboard_RGB.png"):
        assert any(name.endswith("/" + family) for name in refused), (family, rejected)


def test_a_modality_without_statistics_is_refused_without_encoding_and_force_still_answers(infer):
    """An MR volume (nibabel's DICOMs, pydicom-data's enhanced MR) or an ultrasound is refused from its DICOM header
    alone; `force` encodes and answers it, still flagged, with nothing the vocabulary ties to CT or X-ray."""
    from raddiagseg import findings

    for name in ("emri_small.dcm", "US1_UNCI.dcm"):
        path = _pydicom_file(name)
        result = infer(path)
        assert result["domain"]["in_domain"] is False and result["feature_cache"]["encoded"] == result["feature_cache"]["cached"] == 0, \
            (name, result["domain"])
        assert result["model"]["clinical_use"] is False
        forced = infer(path, force=True, max_new_tokens=48)
        assert forced["feature_cache"]["encoded"] > 0 and forced["domain"]["in_domain"] is False, name
        modality = forced["modality"]["value"]
        assert findings.diagnosis_entry(forced["diagnosis"]) is None, forced["answer"]  # every one is CT or X-ray
        assert all(modality in findings.target_modalities(s["name"]) for s in forced["segments"]), forced["segments"]
    us = infer(_pydicom_file("US1_UNCI.dcm"))
    assert us["modality"] == {"value": "us", "source": "dicom"}
    assert "the image is US (from the DICOM header)" in us["domain"]["reason"] and "send modality ct or xray" in \
        us["domain"]["reason"], us["domain"]
    as_xray = infer(_pydicom_file("US1_UNCI.dcm"), modality="xray")  # the user's word: scored as an X-ray (and unlike one)
    assert as_xray["modality"] == {"value": "xray", "source": "param"} and as_xray["domain"]["score"] is not None
    assert as_xray["domain"]["in_domain"] is False
