"""The served app on an Orthanc DICOMweb datastore: store a CT study in Orthanc, infer on it
through serve.py, save a label (written back to Orthanc as DICOM SEG), train on it. Once with the
fast stand-in app (datastore plumbing, roles) and once with the real RadDiag app (a randomly
initialised demo-preset model): label geometry equals the DICOM series', its fine-tuning run
builds its samples from the label saved through Orthanc.

Orthanc comes from Debian's `orthanc` + `orthanc-dicomweb` packages (scripts/install_system_deps.sh);
the test starts its own instance on free ports with storage in a temporary folder."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from live_server import free_port, wait_for_training
from serving_helpers import SERVER_KINDS, bearer, make_users, start_app_server, start_serve, write_stub_app

PLUGIN_DIRS = ["/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins"]


def _dicomweb_plugin():
    for d in PLUGIN_DIRS:
        path = Path(d) / "libOrthancDicomWeb.so"
        if path.exists():
            return path
    return None


def _segmentation_tool():
    return shutil.which("itkimage2segimage") or shutil.which("itkimage2segimage", path=os.path.dirname(sys.executable))


pytestmark = [
    pytest.mark.skipif(shutil.which("Orthanc") is None, reason="Orthanc is not installed (run scripts/install_system_deps.sh)"),
    pytest.mark.skipif(_dicomweb_plugin() is None, reason="orthanc-dicomweb plugin is not installed"),
    pytest.mark.skipif(_segmentation_tool() is None, reason="itkimage2segimage (pip dcmqi) is not installed"),
]


@pytest.fixture
def orthanc(tmp_path_factory):
    """A fresh Orthanc (about a second to start) per test, so tests never see each other's series."""
    base = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {
        "Name": "raddiag-test", "StorageDirectory": str(base / "db"), "IndexDirectory": str(base / "db"),
        "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [str(_dicomweb_plugin())], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (base / "orthanc.json").write_text(json.dumps(config))
    log = open(base / "orthanc.log", "wb")
    process = subprocess.Popen(["Orthanc", str(base / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if requests.get(url + "/system", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("Orthanc did not start: " + (base / "orthanc.log").read_text(errors="replace")[-2000:])
    yield url
    process.terminate()
    process.wait(timeout=20)
    log.close()


def ct_series(folder: Path, n=6, rows=32, cols=28, origin=(0.0, 0.0, 0.0)):
    """Write a small CT series (one DICOM file per slice, real geometry) and return its SeriesInstanceUID."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.Modality, ds.StudyID = "RD001", "Phantom^One", "CT", "1"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.StudyDate, ds.StudyTime, ds.Manufacturer = "20260101", "120000", "RadDiag tests"
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.5
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        pixels = rng.integers(-100, 100, (rows, cols)).astype(np.int16)
        pixels[8:20, 6:18] += 500
        ds.PixelData = pixels.tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(folder / f"{k}.dcm"), write_like_original=False)
    return series


def _seg_in_orthanc(orthanc):
    """The one DICOM SEG instance stored in Orthanc, read with pydicom."""
    segs = requests.post(orthanc + "/tools/find", json={"Level": "Series", "Query": {"Modality": "SEG"}},
                         timeout=30).json()
    assert len(segs) == 1, segs
    [instance] = requests.get(f"{orthanc}/series/{segs[0]}", timeout=30).json()["Instances"]
    return pydicom.dcmread(io.BytesIO(requests.get(f"{orthanc}/instances/{instance}/file", timeout=30).content))


def _write_label(array, reference, path):
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(reference)
    sitk.WriteImage(label, str(path))


def _assert_liver_and_tumour_seg(seg, array):
    """Two segments, named and SNOMED CT-coded from our vocabulary, each with the voxels of its label value."""
    assert [(s.SegmentNumber, s.SegmentLabel, s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
             s.SegmentedPropertyTypeCodeSequence[0].CodeValue, s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning,
             s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) for s in seg.SegmentSequence] == [
        (1, "liver", "123037004", "10200004", "Liver", "SCT"),
        (2, "liver tumour", "49755003", "108369006", "Neoplasm", "SCT")]
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    voxels = {1: 0, 2: 0}
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        voxels[int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)] += int(frame.sum())
    assert voxels == {1: int((array == 1).sum()), 2: int((array == 2).sum())}


def test_orthanc_datastore_store_infer_save_label_train(orthanc, tmp_path):
    # store a study in Orthanc
    series = ct_series(tmp_path / "dicom")
    for f in sorted((tmp_path / "dicom").glob("*.dcm")):
        assert requests.post(orthanc + "/instances", data=f.read_bytes(), timeout=30).status_code == 200

    app = write_stub_app(tmp_path / "app")
    tokens = make_users(tmp_path / "auth.json")
    server = start_serve(app, orthanc + "/dicom-web", tmp_path / "auth.json", tokens["user"],
                         env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")})
    try:
        url, user, admin = server.url, bearer(tokens["user"]), bearer(tokens["admin"])
        # ids are checked against Orthanc's series list
        reply = requests.post(url + "/infer/raddiagseg?image=1.2.3.4.5&output=json", headers=user, timeout=60)
        assert reply.status_code == 404 and "not in the datastore" in reply.json()["detail"]

        # infer on the Orthanc series by its id
        reply = requests.post(url + f"/infer/raddiagseg?image={series}&output=image", headers=user, timeout=120)
        assert reply.status_code == 200, server.log()
        (tmp_path / "pred.nii.gz").write_bytes(reply.content)
        pred = sitk.ReadImage(str(tmp_path / "pred.nii.gz"))
        assert pred.GetSize() == (28, 32, 6)
        assert 0 < sitk.GetArrayFromImage(pred).sum() < 28 * 32 * 6

        # save the (corrected) label: it goes back to Orthanc as a DICOM SEG
        with open(tmp_path / "pred.nii.gz", "rb") as f:
            reply = requests.put(url + f"/datastore/label?image={series}", headers=bearer(tokens["annotator"]),
                                 files={"label": ("label.nii.gz", f)},
                                 data={"params": json.dumps({"label_info": [{"name": "liver"}]})}, timeout=120)
        assert reply.status_code == 200, server.log()
        found = requests.post(orthanc + "/tools/find", json={"Level": "Series", "Query": {"Modality": "SEG"}},
                              timeout=30).json()
        assert len(found) == 1

        # train on it (admin only)
        assert requests.post(url + "/train/raddiagseg", headers=user, json={}, timeout=30).status_code == 403
        reply = requests.post(url + "/train/raddiagseg", headers=admin, json={"steps": 1}, timeout=60)
        assert reply.status_code == 200, reply.text
        status = wait_for_training(url, timeout=180, headers=admin)
        assert status["status"] == "DONE", server.log()
        model = json.loads((app / "model" / "model.json").read_text())
        assert model["labels"] == 1
    finally:
        server.stop()


def test_real_app_on_orthanc_infers_in_series_geometry_saves_seg_and_trains(orthanc, tmp_path):
    app_studies = pytest.importorskip("app_studies")
    pytest.importorskip("raddiagseg.training")
    series = ct_series(tmp_path / "dicom", n=6, rows=40, cols=36, origin=(-50.0, 20.0, 100.0))
    for f in sorted((tmp_path / "dicom").glob("*.dcm")):
        assert requests.post(orthanc + "/instances", data=f.read_bytes(), timeout=30).status_code == 200
    reader = sitk.ImageSeriesReader()
    reference = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom")))

    model_dir = app_studies.random_model_dir(tmp_path / "model")
    tokens = make_users(tmp_path / "auth.json")
    server = start_serve(app_studies.APP_DIR, orthanc + "/dicom-web", tmp_path / "auth.json", tokens["user"],
                         conf={"model_path": model_dir, "work_dir": tmp_path / "work"},
                         env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")}, timeout=300)
    try:
        url, user, admin = server.url, bearer(tokens["user"]), bearer(tokens["admin"])
        params = {"params": json.dumps({"slice": 3, "max_new_tokens": 12})}
        reply = requests.post(url + f"/infer/raddiagseg?image={series}&output=json", headers=user, data=params,
                              timeout=300)
        assert reply.status_code == 200, server.log()
        result = reply.json()
        assert result["modality"]["value"] == "ct" and [s["slice"] for s in result["slices"]] == [3]
        reply = requests.post(url + f"/infer/raddiagseg?image={series}&output=image", headers=user, data=params,
                              timeout=300)
        assert reply.status_code == 200, server.log()
        (tmp_path / "pred.nii.gz").write_bytes(reply.content)
        pred = sitk.ReadImage(str(tmp_path / "pred.nii.gz"))
        assert pred.GetSize() == reference.GetSize() == (36, 40, 6)
        assert np.allclose(pred.GetSpacing(), reference.GetSpacing())
        assert np.allclose(pred.GetOrigin(), reference.GetOrigin(), atol=1e-3)
        assert np.allclose(pred.GetDirection(), reference.GetDirection())

        # a corrected label (liver with a tumour in slices 2-4) with its label info, saved through Orthanc
        array = np.zeros((6, 40, 36), np.uint8)
        array[1:5, 8:30, 6:26] = 1
        array[2:5, 14:22, 10:18] = 2
        _write_label(array, reference, tmp_path / "label.nii.gz")
        info = {"segments": [{"name": "liver", "label_value": 1}, {"name": "liver tumour", "label_value": 2}],
                "detection": True, "diagnosis": "Liver tumour",
                "label_info": [{"name": "liver"}, {"name": "liver tumour"}]}
        with open(tmp_path / "label.nii.gz", "rb") as f:
            reply = requests.put(url + f"/datastore/label?image={series}", headers=bearer(tokens["annotator"]),
                                 files={"label": ("label.nii.gz", f)}, data={"params": json.dumps(info)}, timeout=300)
        assert reply.status_code == 200, server.log()
        # the DICOM SEG in the PACS names and codes each segment (SNOMED CT), with each segment's voxels
        _assert_liver_and_tumour_seg(_seg_in_orthanc(orthanc), array)

        reply = requests.post(url + "/train/raddiagseg", headers=admin, json={"max_steps": 3}, timeout=60)
        assert reply.status_code == 200, reply.text
        status = wait_for_training(url, timeout=600, headers=admin)
        stats = requests.get(url + "/info/", headers=user, timeout=30).json()["train_stats"]["raddiagseg"]
        assert status["status"] == "DONE", f"{stats}\n{server.log()}"
        assert stats["data"]["images"] == 1 and not stats["data"]["skipped"], stats["data"]
        # slice 1: liver only (vqaseg + 1 refseg); slices 2-4: liver and tumour (vqaseg + 2 refseg each)
        assert stats["data"]["train_samples"] == 2 + 3 * 3, stats["data"]
        assert stats["step"] == 3
    finally:
        server.stop()

    # a second server with an empty cache (another machine): the label is in Orthanc only as a DICOM SEG, which
    # carries neither RadDiag's label info nor (as MONAI Label converts it) the full volume: training refuses it
    # with a reason instead of crashing or training on a wrong label, and the server keeps serving
    server = start_serve(app_studies.APP_DIR, orthanc + "/dicom-web", tmp_path / "auth.json", tokens["user"],
                         conf={"model_path": model_dir, "work_dir": tmp_path / "work2"},
                         env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache2")}, timeout=300)
    try:
        url = server.url
        reply = requests.post(url + "/train/raddiagseg", headers=admin, json={"max_steps": 2}, timeout=60)
        assert reply.status_code == 200, reply.text
        status = wait_for_training(url, timeout=600, headers=admin)
        stats = requests.get(url + "/info/", headers=user, timeout=30).json()["train_stats"]["raddiagseg"]
        assert status["status"] == "ERROR" and "no usable corrected labels" in stats["error"], stats
        assert [s["image"] for s in stats["data"]["skipped"]] == [series] and stats["data"]["skipped"][0]["reason"]
        assert stats["published"] is False
        assert requests.post(url + f"/infer/raddiagseg?image={series}&output=json", headers=user, data=params,
                             timeout=300).status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_the_stock_plugins_label_reaches_orthanc_as_a_dicom_seg_with_our_names_and_codes(orthanc, tmp_path, kind):
    """MONAI Label's own client saves a correction in its Slicer plugin's format (every Segment Editor segment, an
    empty one included) through either server; the PACS gets one named, SNOMED-coded segment per label value."""
    app_studies = pytest.importorskip("app_studies")
    series = ct_series(tmp_path / "dicom", n=4, rows=24, cols=20)
    for f in sorted((tmp_path / "dicom").glob("*.dcm")):
        assert requests.post(orthanc + "/instances", data=f.read_bytes(), timeout=30).status_code == 200
    reader = sitk.ImageSeriesReader()
    reference = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom")))
    array = np.zeros((4, 24, 20), np.uint8)
    array[0:4, 4:20, 3:17] = 1
    array[1:3, 8:14, 6:12] = 2
    _write_label(array, reference, tmp_path / "label.nii.gz")

    server = start_app_server(kind, app_studies.APP_DIR, orthanc + "/dicom-web",
                              {"model_path": app_studies.random_model_dir(tmp_path / "model"),
                               "work_dir": tmp_path / "work"}, tmp_path,
                              env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache"),
                                   # dcmqi (pip) next to this Python, as in an activated venv: else start_server
                                   # downloads it from GitHub (serve.py adds that folder itself)
                                   "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])})
    try:
        (tmp_path / "client").mkdir()
        client = server.client(tmp_path / "client")
        plugin_info = [{"name": "liver", "idx": 1}, {"name": "liver tumour", "idx": 2}, {"name": "Segment_3", "idx": 3}]
        client.save_label(series, str(tmp_path / "label.nii.gz"), tag="final",
                          params={"label_info": plugin_info, "model": "raddiagseg"})
    finally:
        server.stop()

    seg = _seg_in_orthanc(orthanc)
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    _assert_liver_and_tumour_seg(seg, array)  # the empty, unknown "Segment_3" is not a segment of the SEG
