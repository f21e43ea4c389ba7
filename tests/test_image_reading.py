"""Real images in (issue 21 items 3-4, issue 24 item 4): DICOM-correct intensities on the DICOMs pydicom and
pydicom-data ship, one-slice files answered as the same slice inside their volume with the input's 3D geometry,
and one "model's view of an image" shared by the app's infer task and `raddiagseg predict`.

Answers come from the app's real infer task (`RadDiagSegInfer`) with the shipped demo model; what reaches the
model is recorded at the ModelRunner, the model itself is untouched."""

import locale

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from app_studies import DEMO_MODEL, ct_phantom_image
from fastapi import HTTPException
from pydicom.data import get_testdata_file

from lib import image_io
from lib.slice_cache import SliceCache
from lib.infers.raddiagseg import RadDiagSegInfer
from lib.model_runner import ModelRunner
from lib.model_store import load_for_serving
from raddiagseg import imaging

pytestmark = pytest.mark.usefixtures("single_thread")


def dicom(name):
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return path


def unit_view(path, window=None):
    return image_io.model_view(image_io.read_image(path)).unit(0, window)


# ---------------------------------------------------------------------------------- DICOM intensities
def test_ct_rescale_slope_and_intercept_are_applied():
    path = dicom("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    view = image_io.model_view(image_io.read_image(path))
    assert view.modality == "ct" and view.slices.shape == (1, 128, 128)
    assert np.array_equal(view.slices[0], hu)  # stored 128..2191, HU -896..1167
    assert np.allclose(view.unit(0), imaging.to_unit_range(hu, "ct", imaging.CT_WINDOW))


def test_the_files_window_is_used_unless_the_request_sends_one():
    path = dicom("693_UNCI.dcm")  # head CT with Window Center 40 / Width 100
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(unit_view(path), imaging.to_unit_range(hu, "ct", (40, 100)))
    assert np.allclose(unit_view(path, (40, 400)), imaging.to_unit_range(hu, "ct", (40, 400)))


def test_monochrome1_chest_cr_equals_its_monochrome2_rendering(tmp_path):
    path = dicom("RG3_UNCR.dcm")  # CR, MONOCHROME1, 10 bits, Window Center 550 / Width 1024
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.int32)
    top = 2 ** int(ds.BitsStored) - 1
    copy = ds.copy()
    copy.PhotometricInterpretation = "MONOCHROME2"
    copy.PixelData = (top - stored).astype(np.uint16).tobytes()
    copy.WindowCenter = top - float(ds.WindowCenter)  # the same VOI window on the inverted values
    mono2 = tmp_path / "cr_monochrome2.dcm"
    copy.save_as(str(mono2))
    as_stored, rendered = unit_view(path), unit_view(mono2)
    assert image_io.model_view(image_io.read_image(path)).modality == "xray"
    assert np.array_equal(as_stored, rendered)
    level, width = top - float(ds.WindowCenter), float(ds.WindowWidth)
    expected = imaging.to_unit_range(np.clip(top - stored, level - width / 2, level + width / 2), "xray")
    assert np.allclose(as_stored, expected)


def ct_without_intercept(tmp_path):
    """CT_small stored as HU+1024, unsigned, with no Rescale Intercept/Slope: values 128..2191 that are not HU."""
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    stored = ds.pixel_array.astype(np.int32)
    del ds.RescaleIntercept, ds.RescaleSlope
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype(np.uint16).tobytes()
    path = tmp_path / "ct_hu_plus_1024.dcm"
    ds.save_as(str(path))
    return path


def test_ct_values_that_cannot_be_hounsfield_units_are_refused_unless_a_window_is_sent(tmp_path):
    path = ct_without_intercept(tmp_path)
    with pytest.raises(imaging.InputError, match="cannot be Hounsfield units: the lowest is 128"):
        unit_view(path)
    assert unit_view(path, (1064, 400)).max() == 1.0  # the user's window in the file's own units
    normalised = tmp_path / "ct01.nii.gz"
    volume = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 16, 16)).astype(np.float32))
    sitk.WriteImage(volume, str(normalised))
    with pytest.raises(imaging.InputError, match="lowest is 0"):
        unit_view(normalised)


@pytest.mark.parametrize("writer", ["nibabel", "itk"])
def test_nan_in_a_nifti_is_refused_like_nan_in_nrrd(tmp_path, writer):
    nib = pytest.importorskip("nibabel")
    values = np.zeros((6, 5, 4), np.float32)
    values[1, 2, 3] = np.nan
    for suffix in (".nii", ".nii.gz"):
        path = tmp_path / f"nan_{writer}{suffix}"
        if writer == "nibabel":
            nib.save(nib.Nifti1Image(values, np.eye(4)), str(path))
        else:
            sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
        assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).any()  # what ITK alone gives
        with pytest.raises(image_io.InputError, match="NaN"):
            image_io.read_image(path)


# ---------------------------------------------------------------------------------- the app, with the demo model
class Recording(ModelRunner):
    """The app's ModelRunner; keeps every image it is given (the model's exact input)."""

    def __init__(self, store):
        super().__init__(store, SliceCache(64), drafts="off")
        self.inputs = []

    def answer(self, images, *args, **kwargs):
        self.inputs += [np.array(i) for i in images]
        return super().answer(images, *args, **kwargs)


class Store:
    def __init__(self, model):
        self.model = model

    def get(self):
        return self.model, "demo"

    def current_dir(self):
        return DEMO_MODEL

    def available(self):
        return True


@pytest.fixture(scope="module")
def demo_model():
    if not (DEMO_MODEL / "model.safetensors").is_file():
        pytest.skip("the demo model is not shipped")
    return load_for_serving(DEMO_MODEL)


def infer_task(model):
    store = Store(model)
    return RadDiagSegInfer(store, Recording(store))


def oblique_volume():
    """A phantom CT of 16 anisotropic axial slices stored permuted and flipped (app_studies), then tilted 12 degrees."""
    image, _, _ = ct_phantom_image(seed=4, size=80, slices=16)
    angle = np.deg2rad(12.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    image.SetDirection(tuple((tilt @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    return image


def test_one_slice_files_are_answered_as_the_same_slice_of_their_volume_with_their_3d_geometry(demo_model, tmp_path):
    volume = oblique_volume()
    volume_path = tmp_path / "volume.nii.gz"
    sitk.WriteImage(volume, str(volume_path))
    assert volume.GetSize()[2] == 16 and not np.allclose(volume.GetDirection(), np.round(volume.GetDirection()))
    whole, single = infer_task(demo_model), infer_task(demo_model)
    same = 0
    for k in range(volume.GetSize()[2]):
        cut = volume[:, :, k : k + 1]  # one slice, its own origin, the volume's spacing and direction
        cut_path = tmp_path / f"slice_{k:02d}.nii.gz"
        sitk.WriteImage(cut, str(cut_path))
        volume_label, volume_answer = whole({"image": str(volume_path), "slice": k})
        cut_label, cut_answer = single({"image": str(cut_path)})
        assert np.array_equal(single.runner.inputs[-1], whole.runner.inputs[-1]), k
        assert cut_answer["answer"] == volume_answer["answer"] and cut_answer["slices"][0]["slice"] == 0
        assert cut_answer["segments"] == volume_answer["segments"]
        written = sitk.ReadImage(cut_label)
        assert written.GetSize() == cut.GetSize() == (volume.GetSize()[0], volume.GetSize()[1], 1)
        assert np.allclose(written.GetSpacing(), cut.GetSpacing()) and np.allclose(written.GetOrigin(), cut.GetOrigin())
        assert np.allclose(written.GetDirection(), cut.GetDirection())
        volume_voxels = sitk.GetArrayFromImage(sitk.ReadImage(volume_label))[k]
        assert np.array_equal(sitk.GetArrayFromImage(written)[0], volume_voxels), k
        same += 1
    assert same == 16
    # the model saw a radiological slice, not the file's raw (permuted, flipped) plane
    raw = sitk.GetArrayFromImage(volume)[5].astype(np.float32)
    assert not np.allclose(single.runner.inputs[5], imaging.to_unit_range(raw, "ct"))


def test_the_app_and_predict_feed_the_model_the_same_array_for_the_same_file(demo_model, tmp_path):
    from raddiagseg.data.builder import build_phantom_dataset
    from raddiagseg.data.records import read_manifest
    from raddiagseg.evaluation.predict import sample_image

    build_phantom_dataset(tmp_path / "data", ct_volumes=2, xrays=6, vqa_images=2, refseg_images=2, workers=1)
    rows = read_manifest(tmp_path / "data" / "manifest.jsonl", None, base=True)
    by_image = {}
    for row in rows:
        by_image.setdefault(row["image"], row)
    files = list(by_image.values())
    picked = [files[i] for i in np.linspace(0, len(files) - 1, 40).round().astype(int)]  # every source
    task = infer_task(demo_model)
    kinds = set()
    for row in picked:
        task({"image": str(tmp_path / "data" / row["image"]), "max_new_tokens": 4})
        assert np.array_equal(task.runner.inputs[-1], sample_image(row)), row["image"]
        kinds.add((row["modality"], row["image"].rsplit(".", 1)[-1]))
    assert len(picked) == 40 and {("ct", "gz"), ("xray", "png")} <= kinds, kinds


def test_uploads_whose_values_cannot_be_read_answer_400_with_the_reason(demo_model, tmp_path):
    task = infer_task(demo_model)
    path = ct_without_intercept(tmp_path)
    with pytest.raises(HTTPException) as refused:
        task({"image": str(path)})
    assert refused.value.status_code == 400 and "cannot be Hounsfield units" in refused.value.detail
    assert "send window" in refused.value.detail and not task.runner.inputs  # nothing reached the model
    label, answer = task({"image": str(path), "window": [1064, 400], "max_new_tokens": 4})
    assert answer["modality"]["value"] == "ct" and sitk.ReadImage(label).GetSize() == (128, 128, 1)
    nan = tmp_path / "nan.nii.gz"
    values = np.zeros((3, 16, 16), np.float32)
    values[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(values), str(nan))
    with pytest.raises(HTTPException) as refused:
        task({"image": str(nan)})
    assert refused.value.status_code == 400 and "NaN" in refused.value.detail


def write_dicom_series(volume, folder):
    """One CT DICOM file per axial slice of `volume` (int16 HU), with its position and orientation tags.

    ITK's GDCM writer switches the process locale to C when it writes these tags and leaves it so (later text
    files would then be read as ASCII), so the locale is put back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_series(volume, folder)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(volume, folder):
    folder.mkdir()
    direction = np.array(volume.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.9f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetSize()[2]):
        cut = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2"), ("0020|0037", orientation),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in position)), ("0020|0013", str(k + 1)),
                           ("0018|0050", f"{volume.GetSpacing()[2]:.6f}"), ("0028|1052", "0"), ("0028|1053", "1")):
            cut.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:02d}.dcm"))
        writer.Execute(cut)


def test_one_dicom_of_a_series_is_answered_as_its_slice_of_the_series(demo_model, tmp_path):
    volume = sitk.Cast(oblique_volume(), sitk.sitkInt16)
    write_dicom_series(volume, tmp_path / "series")
    series = image_io.read_image(tmp_path / "series")
    assert series.GetSize() == volume.GetSize()
    whole, single = infer_task(demo_model), infer_task(demo_model)
    for path in sorted((tmp_path / "series").iterdir())[::5]:
        one = image_io.read_image(path)
        assert one.GetSize()[2] == 1 and np.allclose(one.GetDirection(), series.GetDirection(), atol=1e-6)
        k = int(round(series.TransformPhysicalPointToContinuousIndex(one.GetOrigin())[2]))
        _, volume_answer = whole({"image": str(tmp_path / "series"), "slice": k})
        label, answer = single({"image": str(path)})
        assert np.array_equal(single.runner.inputs[-1], whole.runner.inputs[-1]), path.name
        assert answer["answer"] == volume_answer["answer"]
        assert sitk.ReadImage(label).GetSize() == one.GetSize()


def test_training_data_and_active_learning_see_what_infer_sees(tmp_path):
    """The app's training samples, read back by the trainer's dataset, and the `uncertain` strategy's inputs are
    the infer task's model inputs of the same slices; the masks lie on them as the corrected label does."""
    from lib import training_data
    from lib.activelearning.uncertain import scoring_slices
    from raddiagseg.data.dataset import load_image, load_masks

    image, label, _ = ct_phantom_image(seed=3)  # stored permuted and flipped
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(label, str(tmp_path / "label.nii.gz"))
    info = {"segments": [{"name": "liver", "label_value": 1}, {"name": "liver tumour", "label_value": 2}],
            "detection": True, "diagnosis": "Liver tumour"}
    rows = training_data.samples_for_image("ct", tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz", info, tmp_path / "out")
    view = image_io.model_view(image_io.read_image(tmp_path / "ct.nii.gz"))
    labels = view.orientation.to_view(sitk.GetArrayFromImage(label))
    masks = 0
    for row in rows:
        k = view.view_index(row["slice"])
        unit = load_image(row, tmp_path / "out")
        assert np.array_equal(unit, view.unit(k)), row["id"]
        for target, mask in zip(row["targets"], load_masks(row, tmp_path / "out", unit.shape)):
            assert np.array_equal(mask > 0, labels[k] == (1 if target["name"] == "liver" else 2)), row["id"]
            masks += 1
    assert len(rows) > 10 and masks > 10
    n = view.n_slices
    picks = sorted({int(n * f) for f in (0.25, 0.5, 0.75)})
    for scored, k in zip(scoring_slices(image_io.read_image(tmp_path / "ct.nii.gz")), picks):
        assert np.array_equal(scored, view.unit(k))
