"""Converters on tiny hand-made fixtures that use the public datasets' real file naming,
including the bad-input cases: each bad file is named in the report and the rest is still built."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from raddiagseg import templates
from raddiagseg.data import io
from raddiagseg.data.builder import build_dataset
from raddiagseg.data.covidqu import convert_covidqu
from raddiagseg.data.msd import convert_msd
from raddiagseg.data.records import BuildReport
from raddiagseg.data.refseg_folders import convert_refseg
from raddiagseg.data.vqa_sets import convert_slake, convert_vqarad

LIVER_LABELS = {"0": "background", "1": "liver", "2": "cancer"}


def tiny_liver(tumour_px_per_slice=(0, 0, 30, 80, 6, 0)):
    """(hu, label) in display layout (z, row, col): a 'liver' block on the image left with tumours of given areas."""
    z, n = len(tumour_px_per_slice), 40
    hu = np.full((z, n, n), -1000, np.int16)
    hu[:, 5:35, 5:35] = -100
    label = np.zeros((z, n, n), np.uint8)
    label[:, 8:30, 6:24] = 1
    hu[label == 1] = 60
    for k, area in enumerate(tumour_px_per_slice):
        if area:
            side = int(np.ceil(np.sqrt(area)))
            block = np.zeros((n, n), bool)
            block[10:10 + side, 8:8 + side] = True
            block &= np.cumsum(block.ravel()).reshape(n, n) <= area
            label[k][block] = 2
            hu[k][block] = 20
    return hu, label


def write_msd_case(task_dir, name, hu, label, axcodes=("L", "P", "S"), spacing=(0.8, 0.8, 3.0)):
    """Write display-layout arrays as MSD NIfTI files in the given direction-cosine layout."""
    lps_hu, lps_label = hu.transpose(2, 1, 0), label.transpose(2, 1, 0)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-indexed array in RAS+ world
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("L", "P", "S")),
                                                nib.orientations.axcodes2ornt(axcodes))
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, lps_hu.shape)
    for sub, data in (("imagesTr", lps_hu), ("labelsTr", lps_label)):
        (task_dir / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(nib.orientations.apply_orientation(data, transform), new_affine), str(task_dir / sub / name))


def write_dataset_json(task_dir, names, labels=LIVER_LABELS):
    meta = {"name": "Liver", "labels": labels, "modality": {"0": "CT"},
            "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names]}
    (task_dir / "dataset.json").write_text(json.dumps(meta))


def test_msd_liver_slices_positives_negatives_and_small_fragments(tmp_path):
    task = tmp_path / "Task03_Liver"
    hu, label = tiny_liver()
    write_msd_case(task, "liver_12.nii.gz", hu, label)
    write_dataset_json(task, ["liver_12.nii.gz"])
    report = BuildReport()
    rows = convert_msd(task, tmp_path / "out", report, min_organ_pixels=50, min_tumour_pixels=20)
    assert report.skipped == []
    vqaseg = {r["slice"]: r for r in rows if r["task"] == "vqaseg"}
    # slices 2 and 3 (30 and 80 px tumour) are positives, slice 4 (6 px fragment) is left out, others negative
    assert sorted(k for k, r in vqaseg.items() if r["detection"]) == [2, 3]
    assert sorted(k for k, r in vqaseg.items() if not r["detection"]) == [0, 1, 5]
    pos = vqaseg[3]
    assert pos["id"] == "msd_liver_liver_12_s003" and pos["volume"] == "liver_12" and pos["source"] == "msd_liver"
    assert pos["diagnosis"] == "Liver tumour"
    assert pos["answer"] == templates.vqaseg_answer(True, "Liver tumour", ["liver", "liver tumour"])
    organ = io.read_slice(tmp_path / "out" / pos["targets"][0]["mask"])
    tumour = io.read_slice(tmp_path / "out" / pos["targets"][1]["mask"])
    image = io.read_slice(tmp_path / "out" / pos["image"])
    assert tumour.sum() == 80 and organ.sum() == 22 * 18  # organ mask includes the tumour
    assert np.array_equal(image, hu[3]) and np.array_equal(organ, (label[3] > 0).astype(np.uint8))
    refs = [r for r in rows if r["task"] == "refseg"]
    assert {(r["slice"], r["targets"][0]["name"]) for r in refs if r["targets"][0]["role"] == "abnormality"} == {(2, "liver tumour"), (3, "liver tumour")}


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("P", "L", "I"), ("A", "R", "S")])
def test_msd_slices_look_the_same_whatever_the_direction_cosines(tmp_path, axcodes):
    hu, label = tiny_liver()
    hu[:, 0:3, 0:6] = 500  # marker: anterior, patient's right corner
    for name, codes in (("liver_1.nii.gz", ("L", "P", "S")), ("liver_2.nii.gz", axcodes)):
        write_msd_case(tmp_path / "Task03_Liver", name, hu, label, codes)
    write_dataset_json(tmp_path / "Task03_Liver", ["liver_1.nii.gz", "liver_2.nii.gz"])
    rows = convert_msd(tmp_path / "Task03_Liver", tmp_path / "out", BuildReport(), min_organ_pixels=50)
    a = {r["slice"]: r for r in rows if r["task"] == "vqaseg" and r["volume"] == "liver_1"}
    b = {r["slice"]: r for r in rows if r["task"] == "vqaseg" and r["volume"] == "liver_2"}
    assert sorted(a) == sorted(b)
    for k in a:
        image_a, image_b = io.read_slice(tmp_path / "out" / a[k]["image"]), io.read_slice(tmp_path / "out" / b[k]["image"])
        assert np.array_equal(image_a, image_b) and np.array_equal(image_a, hu[k])
        affine_a = nib.load(str(tmp_path / "out" / a[k]["image"])).affine
        affine_b = nib.load(str(tmp_path / "out" / b[k]["image"])).affine
        assert np.allclose(affine_a[:3, :3], affine_b[:3, :3])


def test_msd_bad_input_is_reported_and_the_rest_built(tmp_path):
    task = tmp_path / "Task03_Liver"
    hu, label = tiny_liver()
    write_msd_case(task, "liver_0.nii.gz", hu, label)
    write_msd_case(task, "liver_1.nii.gz", hu, label[:, :, :30])  # label shape differs from image
    write_msd_case(task, "liver_2.nii.gz", np.zeros_like(hu), label)  # empty (constant) volume
    write_dataset_json(task, ["liver_0.nii.gz", "liver_1.nii.gz", "liver_2.nii.gz", "liver_3.nii.gz"],
                       labels={"0": "background", "1": "liver", "2": "cancer", "3": "hepatic vessel wall"})
    report = BuildReport()
    rows = convert_msd(task, tmp_path / "out", report, min_organ_pixels=50)
    assert {r["volume"] for r in rows} == {"liver_0"}
    reasons = {path.rsplit("/", 1)[-1]: reason for path, reason in report.skipped}
    assert "differs from image shape" in reasons["liver_1.nii.gz"]
    assert "empty volume" in reasons["liver_2.nii.gz"]
    assert "missing file" in reasons["liver_3.nii.gz"]
    assert "unknown label 3" in reasons["dataset.json"]


def test_msd_without_dataset_json_or_known_organ_is_skipped(tmp_path):
    report = BuildReport()
    assert convert_msd(tmp_path, tmp_path / "out", report) == []
    assert "missing dataset.json" in report.skipped[0][1]
    write_dataset_json(tmp_path, [], labels={"0": "background", "1": "brain stem"})
    report = BuildReport()
    assert convert_msd(tmp_path, tmp_path / "out", report) == []
    assert any("no known organ" in reason for _, reason in report.skipped)


def covidqu_tree(root):
    """Real COVID-QU-Ex naming: covid_N.png, non_COVID (N).png, Normal (N).png, 0/255 masks."""
    base = root / "Infection Segmentation Data" / "Infection Segmentation Data"
    lung = np.zeros((32, 32), np.uint8)
    lung[4:28, 3:14] = 255
    lung[4:28, 18:29] = 255
    infection = np.zeros_like(lung)
    infection[18:26, 4:10] = 255
    image = (np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8)
    files = {("Train", "COVID-19", "covid_12.png"): infection, ("Val", "Non-COVID", "non_COVID (12).png"): np.zeros_like(lung),
             ("Test", "Normal", "Normal (12).png"): np.zeros_like(lung)}
    for (split, kind, name), inf in files.items():
        folder = base / split / kind
        for sub, array in (("images", image), ("lung masks", lung), ("infection masks", inf)):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / sub / name)
    return base


def test_covidqu_classes_map_to_vqaseg_answers(tmp_path):
    covidqu_tree(tmp_path / "COVID-QU-Ex")
    report = BuildReport()
    rows = convert_covidqu(tmp_path / "COVID-QU-Ex", tmp_path / "out", report)
    assert report.skipped == []
    vqaseg = {r["id"]: r for r in rows if r["task"] == "vqaseg"}
    assert set(vqaseg) == {"covidqu_covid_train_covid_12", "covidqu_noncovid_val_non_covid_12", "covidqu_normal_test_normal_12"}
    covid, noncovid, normal = (vqaseg[k] for k in sorted(vqaseg))
    assert covid["split"] == "train" and covid["diagnosis"] == "COVID-19 infection"
    assert [t["name"] for t in covid["targets"]] == ["lung", "infection"]
    assert noncovid["split"] == "val" and noncovid["answer"] == templates.vqaseg_answer(True, "Non-COVID infection", ["lung"])
    assert normal["split"] == "test" and normal["answer"] == templates.NEGATIVE_ANSWER and normal["targets"] == []
    mask = io.read_slice(tmp_path / "out" / covid["targets"][1]["mask"])
    assert mask.dtype == np.uint8 and mask.max() == 1 and mask.sum() == 48


def test_covidqu_bad_files_are_named_and_skipped(tmp_path):
    base = covidqu_tree(tmp_path)
    (base / "Train" / "COVID-19" / "images" / "covid_13.png").write_bytes(b"\x89PNG broken")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(base / "Test" / "Normal" / "lung masks" / "Normal (12).png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(base / "Val" / "Non-COVID" / "images" / "non_COVID (13).png")
    report = BuildReport()
    rows = convert_covidqu(tmp_path, tmp_path / "out", report)
    reasons = {path.rsplit("/", 1)[-1]: reason for path, reason in report.skipped}
    assert "unreadable image" in reasons["covid_13.png"]
    assert "differs from image shape" in reasons["Normal (12).png"]
    assert "missing mask" in reasons["non_COVID (13).png"]
    assert {r["id"] for r in rows if r["task"] == "vqaseg"} == {"covidqu_covid_train_covid_12", "covidqu_noncovid_val_non_covid_12"}


def test_vqarad_and_slake_rows(tmp_path):
    rad = tmp_path / "VQA_RAD"
    (rad / "VQA_RAD Image Folder").mkdir(parents=True)
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(rad / "VQA_RAD Image Folder" / "synpic54610.jpg")
    entries = [
        {"qid": 1, "image_name": "synpic54610.jpg", "image_organ": "HEAD", "question": "Is this an MRI?", "answer": "Yes",
         "answer_type": "CLOSED", "phrase_type": "freeform"},
        {"qid": 2, "image_name": "synpic54610.jpg", "image_organ": "HEAD", "question": "What is abnormal?",
         "answer": "ring enhancing lesion", "answer_type": "OPEN", "phrase_type": "freeform"},
        {"qid": 3, "image_name": "synpic99999.jpg", "image_organ": "CHEST", "question": "Is there a mass?", "answer": "No",
         "answer_type": "CLOSED", "phrase_type": "test_freeform"},
    ]
    (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries))
    report = BuildReport()
    rows = convert_vqarad(rad / "VQA_RAD Dataset Public.json", tmp_path / "out", report)
    assert [(r["id"], r["answer_type"], r["modality"], r["split"]) for r in rows] == [
        ("vqarad_1", "closed", "mri", "train"), ("vqarad_2", "open", "mri", "train")]
    assert "synpic99999.jpg" in report.skipped[0][0] and "missing file" in report.skipped[0][1]
    assert io.read_slice(tmp_path / "out" / rows[0]["image"]).shape == (16, 16)

    slake = tmp_path / "Slake1.0"
    (slake / "imgs" / "xmlab102").mkdir(parents=True)
    Image.fromarray(np.full((16, 16, 3), 40, np.uint8)).save(slake / "imgs" / "xmlab102" / "source.jpg")
    q = {"img_id": 102, "img_name": "xmlab102/source.jpg", "location": "Lung", "modality": "X-Ray", "base_type": "vqa"}
    (slake / "train.json").write_text(json.dumps([
        {**q, "qid": 7, "question": "Does the picture contain lung?", "answer": "Yes", "answer_type": "CLOSED", "q_lang": "en"},
        {**q, "qid": 8, "question": "图片中包含肺吗？", "answer": "是", "answer_type": "CLOSED", "q_lang": "zh"}]))
    (slake / "validate.json").write_text("[]")
    (slake / "test.json").write_text(json.dumps([
        {**q, "qid": 9, "question": "Which organ is abnormal?", "answer": "Lung", "answer_type": "OPEN", "q_lang": "en"}]))
    report = BuildReport()
    rows = convert_slake(slake, tmp_path / "out", report)
    assert [(r["id"], r["answer_type"], r["modality"], r["split"]) for r in rows] == [
        ("slake_7", "closed", "xray", "train"), ("slake_9", "open", "xray", "test")]
    assert report.skipped == []


def test_biomedparse_style_refseg_folder(tmp_path):
    root = tmp_path / "BiomedParse"
    for folder in ("train", "train_mask"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(np.full((24, 24), 100, np.uint8)).save(root / "train" / "liver_3_slice_042_CT_abdomen.png")
    mask = np.zeros((24, 24), np.uint8)
    mask[5:15, 5:15] = 255
    rgba = np.dstack([mask, mask, mask, np.full_like(mask, 255)])  # as matplotlib's imsave writes masks
    Image.fromarray(rgba).save(root / "train_mask" / "liver_3_slice_042_CT_abdomen_liver.png")
    Image.fromarray(mask).save(root / "train_mask" / "liver_3_slice_042_CT_abdomen_liver+tumor.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(root / "train" / "case_7_abdomen.png")
    rows = convert_refseg(root, tmp_path / "out", report := BuildReport())
    assert sorted((r["targets"][0]["name"], r["targets"][0]["role"], r["modality"]) for r in rows) == [
        ("liver", "organ", "ct"), ("liver tumour", "abnormality", "ct")]
    assert all(r["question"] == templates.refseg_question(r["targets"][0]["name"], "ct") for r in rows)
    assert "no modality token" in report.skipped[0][1]


def test_build_with_only_bad_sources_builds_nothing(tmp_path):
    rows, report = build_dataset(tmp_path / "out", msd=[tmp_path / "missing_task"], covidqu=tmp_path)
    assert rows == [] and not (tmp_path / "out" / "manifest.jsonl").exists()
    assert len(report.skipped) == 2
    summary = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert summary["rows"] == 0 and len(summary["skipped"]) == 2
