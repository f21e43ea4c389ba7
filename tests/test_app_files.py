"""The app's image reading, slice view, label files and label info (no model needed)."""


import numpy as np
import pytest
import SimpleITK as sitk

from lib import image_io, label_files, segments

# index axes i, j, k → LPS: i along -P (flipped), j along +L, k along -S (flipped): a permuted, flipped volume
ODD_DIRECTION = (0, 1, 0, -1, 0, 0, 0, 0, -1)


def make_volume(size=(12, 10, 6), spacing=(0.7, 0.9, 3.0), direction=ODD_DIRECTION, origin=(10.0, -20.0, 30.0)):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=tuple(reversed(size))).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


def assert_same_geometry(a, b):
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing())
    assert np.allclose(a.GetOrigin(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection())


def test_view_is_the_radiological_axial_view_and_maps_back():
    image = make_volume()
    array = sitk.GetArrayFromImage(image)
    view = image_io.VolumeView.of(image)
    volume = view.to_view(array)
    oriented = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))  # [S, P, L] by definition
    assert np.array_equal(volume, oriented)
    assert np.array_equal(view.from_view(volume), array)
    # slice k of the file's through-plane axis (k runs to -S here) is view slice n-1-k
    n = volume.shape[0]
    assert view.view_index(1, n) == n - 2
    assert np.array_equal(np.sort(array[1].ravel()), np.sort(volume[n - 2].ravel()))


def test_view_matches_the_dataset_builder(tmp_path):
    data_io = pytest.importorskip("raddiagseg.data.io")
    image = make_volume()
    path = tmp_path / "vol.nii.gz"
    sitk.WriteImage(image, str(path))
    lps, _ = data_io.load_volume_lps(path)
    volume = image_io.VolumeView.of(sitk.ReadImage(str(path))).to_view(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    for k in range(lps.shape[2]):
        assert np.array_equal(data_io.axial_slice(lps, k), volume[k])


def volume_with_organ_and_tumour():
    """A small volume with an organ mask and a tumour inside it (numpy z, y, x)."""
    image = make_volume()
    shape = tuple(reversed(image.GetSize()))
    organ = np.zeros(shape, bool)
    organ[1:5, 2:8, 3:10] = True
    tumour = np.zeros(shape, bool)
    tumour[2:4, 4:6, 5:7] = True
    return image, organ, tumour


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd"])
def test_label_map_keeps_input_geometry_and_paints_abnormality_on_top(tmp_path, extension):
    image, organ, tumour = volume_with_organ_and_tumour()
    segs = segments.assign(["liver", "liver tumour"])
    path = tmp_path / f"label{extension}"
    label_files.write(path, image, segs, {"liver": organ, "liver tumour": tumour})
    written = sitk.ReadImage(str(path))
    assert_same_geometry(written, image)
    labels = sitk.GetArrayFromImage(written)
    assert set(np.unique(labels)) == {0, 1, 2}
    assert np.array_equal(labels == 2, tumour)
    assert np.array_equal(labels == 1, organ & ~tumour)


def test_seg_nrrd_has_names_colours_terminology_and_overlapping_layers(tmp_path):
    slicerio = pytest.importorskip("slicerio")
    image, organ, tumour = volume_with_organ_and_tumour()
    segs = segments.assign(["liver", "liver tumour", "spleen"])  # spleen: no voxels, still a segment
    path = tmp_path / "result.seg.nrrd"
    label_files.write(path, image, segs, {"liver": organ, "liver tumour": tumour})
    seg = slicerio.read_segmentation(str(path))
    names = slicerio.segment_names(seg)
    assert names == ["liver", "liver tumour", "spleen"]
    liver = slicerio.segment_from_name(seg, "liver")
    tumour_seg = slicerio.segment_from_name(seg, "liver tumour")
    assert liver["terminology"]["type"][1] == "10200004"
    assert tumour_seg["terminology"]["type"][1] == "108369006"
    assert np.allclose(liver["color"], np.array([221, 130, 101]) / 255, atol=1e-3)
    assert liver["layer"] != tumour_seg["layer"]  # overlap kept in separate layers
    ijk_liver = slicerio.segment_mask(seg, liver)
    assert np.array_equal(np.transpose(ijk_liver), organ)
    assert np.array_equal(np.transpose(slicerio.segment_mask(seg, tumour_seg)), tumour)
    expected = image_io.ijk_to_lps(image)
    assert np.allclose(seg["ijkToLPS"], expected)


def test_2d_png_reads_as_xray_and_label_keeps_its_size(tmp_path):
    array = (np.arange(40 * 30).reshape(30, 40) % 256).astype(np.uint8)
    path = tmp_path / "cxr.png"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    image = image_io.read_image(path)
    assert image.GetDimension() == 2
    assert image_io.infer_modality(image, image_io.image_array(image)) == "xray"
    out = tmp_path / "label.nii.gz"
    mask = np.zeros((30, 40), bool)
    mask[5:10, 3:9] = True
    label_files.write(out, image, segments.assign(["lung"]), {"lung": mask})
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == image.GetSize()
    assert np.array_equal(np.squeeze(sitk.GetArrayFromImage(written)) == 1, mask)


@pytest.mark.parametrize("name, write, expected", [
    ("cxr.jpg", lambda p: sitk.WriteImage(sitk.GetImageFromArray(_ramp(np.uint8)), p), "xray"),
    ("photo.jpg", lambda p: sitk.WriteImage(sitk.GetImageFromArray(np.stack([_ramp(np.uint8)] * 3, -1), isVector=True), p),
     "xray"),
    ("cxr16.png", lambda p: sitk.WriteImage(sitk.GetImageFromArray(_ramp(np.uint16) * 16), p), "xray"),
    ("dx.dcm", lambda p: _dicom(p, _ramp(np.uint16) * 16, "DX"), "xray"),
    ("ct_slice.dcm", lambda p: _dicom(p, _ramp(np.int16) * 8 - 1000, "CT"), "ct"),
    ("ct_slice.nii.gz", lambda p: sitk.WriteImage(sitk.GetImageFromArray(_ramp(np.int16) - 100), p), "ct"),
    ("mr.dcm", lambda p: _dicom(p, _ramp(np.uint16), "MR"), "mri"),
])
def test_2d_formats_read_as_one_grey_slice_with_their_modality(tmp_path, name, write, expected):
    path = str(tmp_path / name)
    write(path)
    image = image_io.read_image(path)  # a one-slice DICOM keeps its 3D geometry; the model sees one slice
    assert image.GetSize()[:2] == (40, 30) and image.GetNumberOfComponentsPerPixel() == 1
    assert image_io.model_view(image).slices.shape == (1, 30, 40)
    assert image_io.infer_modality(image, image_io.image_array(image)) == expected


def test_nrrd_volume_reads_as_ct_with_its_geometry(tmp_path):
    volume = make_volume()
    sitk.WriteImage(volume, str(tmp_path / "ct.nrrd"))
    image = image_io.read_image(tmp_path / "ct.nrrd")
    assert_same_geometry(image, volume)
    assert image_io.infer_modality(image, image_io.image_array(image)) == "ct"


def test_gzipped_nifti_reads_exactly_as_itk_reads_it_and_a_truncated_one_is_refused(tmp_path):
    """.nii.gz files are decompressed by zlib before ITK reads them (faster): same voxels, type and geometry."""
    volume = make_volume()
    slice2d = sitk.GetImageFromArray(_ramp(np.int16))
    slice2d.SetSpacing((0.7, 0.8))
    slice2d.SetOrigin((-12.5, 30.0))
    for name, original in (("ct.nii.gz", volume), ("slice.nii.gz", slice2d)):
        path = str(tmp_path / name)
        sitk.WriteImage(original, path, useCompression=True)
        expected, image = sitk.ReadImage(path), image_io.read_image(path)
        assert image.GetDimension() == expected.GetDimension() and image.GetPixelID() == expected.GetPixelID()
        assert image.GetSpacing() == expected.GetSpacing() and image.GetOrigin() == expected.GetOrigin()
        assert image.GetDirection() == expected.GetDirection()
        assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected))
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(slice2d, str(plain))
    named_gz = plain.rename(tmp_path / "not-really.nii.gz")  # not gzip after all: ITK reads it as it is
    assert np.array_equal(image_io.image_array(image_io.read_image(named_gz)), _ramp(np.int16))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes((tmp_path / "ct.nii.gz").read_bytes()[:600])
    with pytest.raises(image_io.InputError, match="truncated or corrupt"):
        image_io.read_image(truncated)


def _ramp(dtype):
    return (np.arange(30 * 40).reshape(30, 40) % 200 + 20).astype(dtype)


def _dicom(path, array, modality):
    image = sitk.GetImageFromArray(array)
    image.SetMetaData(image_io.MODALITY_TAG, modality)
    sitk.WriteImage(image, path)


def test_bad_images_give_messages(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not an image")
    with pytest.raises(image_io.InputError, match="cannot read"):
        image_io.read_image(junk)
    values = np.zeros((4, 5, 6), dtype=np.float32)
    values[1, 2, 3] = np.nan
    nan = sitk.GetImageFromArray(values)
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(nan, str(path))
    with pytest.raises(image_io.InputError, match="NaN"):
        image_io.image_array(image_io.read_image(path))
    with pytest.raises(image_io.InputError, match="only works for 2D"):
        image_io.label_extension(".png", is_volume=True)


def test_segments_resolve_synonyms_and_carry_codes():
    assert segments.canonical_name("hepatic organ") == "liver"
    assert segments.canonical_name("tumour", "Pancreas tumour") == "pancreas tumour"
    assert segments.canonical_name("tumour", "Liver tumour") == "liver tumour"
    described = segments.assign(["lung", "infection", "lung"])
    assert [(s["name"], s["label_value"], s["role"]) for s in described] == [("lung", 1, "organ"), ("infection", 2, "abnormality")]
    assert described[0]["terminology"]["type"] == ["SCT", "39607008", "Lung"]
    assert "SCT^39607008^Lung" in described[0]["terminology"]["slicer"]
    assert set(segments.label_names()) >= {"liver", "liver tumour", "pancreas", "lung", "infection"}


def test_label_info_keys_and_errors():
    pytest.importorskip("raddiagseg.answers")
    from lib import label_info
    info = label_info.parse({"label_names": {"background": 0, "liver": 1, "tumour": 2}, "diagnosis": "Liver tumour", "detection": True})
    assert [(n, v, r) for n, v, r in info.segments] == [("liver", 1, "organ"), ("liver tumour", 2, "abnormality")]
    from_answer = label_info.parse({"segments": [{"name": "lung", "label_value": 1}], "answer": "1. Yes\n2. COVID-19 infection"})
    assert from_answer.detection is True and from_answer.diagnosis == "COVID-19 infection"
    with pytest.raises(label_info.LabelInfoError, match="label_value"):
        label_info.parse({"segments": [{"name": "liver"}]})
    with pytest.raises(label_info.LabelInfoError, match="slice"):
        label_info.parse({"segments": [], "slice": -1})


def test_diagnosis_is_reported_only_for_a_positive_step_one():
    from types import SimpleNamespace

    from lib import response

    def summary(answer):
        return response.slice_summary(SimpleNamespace(answer=answer, segments=[], agreement={}))[0]

    ref = summary("Here is the mask:\nliver")  # a Ref-Seg answer (the demo model's, without its seg token)
    assert ref["detection"] is None and ref["diagnosis"] is None
    assert summary("1. No")["diagnosis"] is None
    positive = summary("1. Yes\n2. Liver tumour\n3. Segmentation masks:\n- liver <seg000>")
    assert positive["detection"] is True and positive["diagnosis"] == "Liver tumour"
