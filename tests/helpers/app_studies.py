"""Small phantom studies for the app's server tests: a CT volume stored with a permuted, flipped
direction and anisotropic spacing, and an 8-bit chest X-ray, written where a datastore reads them."""

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

APP_DIR = Path(__file__).resolve().parents[2] / "MONAILabelApp"
DEMO_MODEL = APP_DIR / "model" / "raddiagseg-demo"
ODD_ORIENTATION = "PRI"  # index axes run to P, R, I: a permuted and flipped layout of the same anatomy


def ct_phantom_image(seed=3, size=96, slices=10, task="liver", tumours=1):
    """(SimpleITK image with an odd direction, matching label image) from the project's CT phantom generator."""
    phantoms = pytest.importorskip("raddiagseg.data.phantoms")
    phantom = phantoms.generate_ct(np.random.default_rng(seed), task, size=size, slices=slices, tumours=tumours)
    images = []
    for array in (phantom.hu.astype(np.int16), phantom.label.astype(np.uint8)):
        image = sitk.GetImageFromArray(array)  # (z, row, col) = [S, P, L]: identity direction is LPS
        dz, dr, dc = phantom.spacing
        image.SetSpacing((float(dc), float(dr), float(dz)))
        image.SetOrigin((-120.0, 35.5, 410.0))
        images.append(sitk.DICOMOrient(image, ODD_ORIENTATION))
    return images[0], images[1], phantom


def xray_phantom(seed=5, kind="COVID-19", size=128):
    phantoms = pytest.importorskip("raddiagseg.data.phantoms")
    return phantoms.generate_xray(np.random.default_rng(seed), kind, size=size)


def write_studies(folder, ct_seed=3, xray_seed=5):
    """ct_liver.nii.gz (odd direction) + cxr_covid.png in `folder`; returns {id: (image, label or None)}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ct, ct_label, _ = ct_phantom_image(seed=ct_seed)
    sitk.WriteImage(ct, str(folder / "ct_liver.nii.gz"))
    xray = xray_phantom(seed=xray_seed)
    sitk.WriteImage(sitk.GetImageFromArray(xray.image), str(folder / "cxr_covid.png"))
    return {"ct_liver": (ct, ct_label), "cxr_covid": (xray.image, xray)}


def random_model_dir(folder):
    """A randomly initialised demo-preset model folder (answers are gibberish; shapes and plumbing are real)."""
    raddiagseg = pytest.importorskip("raddiagseg")
    pytest.importorskip("raddiagseg.model.raddiagseg")
    folder = Path(folder)
    raddiagseg.build_model("demo").save_pretrained(str(folder))
    return folder


def assert_same_geometry(label_path, image):
    """The label file has the image's size, spacing, origin and direction; returns its array."""
    label = sitk.ReadImage(str(label_path))
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetSpacing(), image.GetSpacing())
    assert np.allclose(label.GetOrigin(), image.GetOrigin())
    assert np.allclose(label.GetDirection(), image.GetDirection())
    return sitk.GetArrayFromImage(label)


FINDING_FIELDS = {"name", "role", "organ", "label_value", "volume_ml", "max_diameter_mm", "slices", "centroid_lps_mm",
                  "score"}  # issue 23; `index`/`count` added when one target has several lesions


def assert_volume_answer_consistent(result, label_path, image):
    """What any model's whole-volume answer must hold (issue 23), checked against the label file the server wrote:

    - every segment is a finding and is named in the answer text, with a line per finding giving its size and
      slices; a normal volume names no segment; a volume no slice answered yes or no to lists its masks only;
    - segments of an abnormal volume are the organ and abnormality of the diagnosis, each lesion in that organ;
    - each finding's volume and centroid are those of its voxels in the label file (organ: its lesions included),
      its slices the range they occupy; `volume.discarded` says what was dropped and why."""
    from raddiagseg.findings import describe_finding, diagnosis_entry
    from raddiagseg.imaging import VolumeView

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    found, segments = result["findings"], {s["name"]: s for s in result["segments"]}
    assert set(segments) == {f["name"] for f in found}, (segments, found)
    for finding in found:
        extra = {"index", "count"} if finding.get("count", 1) > 1 else set()
        assert set(finding) == FINDING_FIELDS | extra, finding
        assert finding["label_value"] == segments[finding["name"]]["label_value"]
        assert f"- {describe_finding(finding)}" in result["answer"], (finding, result["answer"])
    for name in segments:
        assert re.search(rf"\b{re.escape(name)} <seg\d{{3}}>", result["answer"]), (name, result["answer"])
    for entry in result["volume"]["discarded"]:
        assert set(entry) == {"name", "slices", "voxels", "reason"} and entry["voxels"] > 0 and entry["reason"], entry
    if result["detection"] is False:
        assert not found and not labels.any(), result["answer"]
        return
    lesions = [f for f in found if f["role"] == "abnormality"]
    if result["detection"] is None:  # no slice said yes or no (unreadable answers): the masks stand, as for Ref-Seg
        assert result["diagnosis"] is None and result["answer"].startswith("Segmentation masks:"), result["answer"]
    else:
        entry = diagnosis_entry(result["diagnosis"]) or {}
        assert {f["name"] for f in found} <= {entry.get("organ"), entry.get("abnormality")}, (result["diagnosis"], found)
        assert all(f["organ"] == entry.get("organ") for f in lesions), lesions

    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    voxel_ml = abs(np.linalg.det(matrix[:3, :3])) / 1000
    view = VolumeView.of(image)
    for name in segments:
        of_name = [f for f in found if f["name"] == name]
        values = [segments[name]["label_value"]]
        if of_name[0]["role"] == "organ":  # its volume includes its lesions
            values += [segments[f["name"]]["label_value"] for f in lesions if f["organ"] == name]
        voxels = np.isin(labels, values)
        assert sum(f["volume_ml"] for f in of_name) == pytest.approx(voxels.sum() * voxel_ml, abs=1e-3 * len(of_name))
        ijk = np.argwhere(voxels)[:, ::-1]
        centre = (matrix @ [*ijk.mean(0), 1.0])[:3]
        weighted = sum(np.array(f["centroid_lps_mm"]) * f["volume_ml"] for f in of_name) / sum(f["volume_ml"] for f in of_name)
        assert np.allclose(weighted, centre, atol=0.11), (name, weighted, centre)
        on = np.nonzero(view.to_view(voxels).any(axis=(1, 2)))[0]
        numbers = {view.view_index(int(i), view.to_view(voxels).shape[0]) for i in on}
        covered = {k for f in of_name for k in range(f["slices"][0], f["slices"][1] + 1)}
        assert numbers <= covered and {f["slices"][0] for f in of_name} | {f["slices"][1] for f in of_name} <= numbers
