"""`raddiagseg score-volumes` (raddiagseg.evaluation.volumes): the whole-volume benchmark of issue 23.

The model is a stand-in that answers each slice from a known "predicted" label map (its own mistakes written into
that map), so every number the command reports has an exact expected value. It runs through the command line, on
MSD-layout NIfTI volumes written here, with the app's slice skipping and organ completion."""

import json

import nibabel as nib
import numpy as np
import pytest
from test_volume_findings import Reply, Segment

from raddiagseg import cli, templates
from raddiagseg.evaluation import volumes
from raddiagseg.imaging import to_unit_range

SPACING = (0.8, 0.8, 2.5)  # mm; one voxel is 1.6 uL
VOXEL_ML = 0.8 * 0.8 * 2.5 / 1000
SHAPE = (14, 36, 40)  # view order: slices, rows, cols


def box(k, r, c):
    mask = np.zeros(SHAPE, bool)
    mask[k[0]:k[1], r[0]:r[1], c[0]:c[1]] = True
    return mask


def write_case(root, task, name, label_view, seed):
    """An MSD case: CT noise around 40 HU inside the body (slices 1..), air on slice 0; the label as given."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(40, 30, SHAPE).astype(np.int16)
    ct[0] = -1000
    affine = np.diag([*SPACING, 1.0])  # RAS: the reader reorients it to LPS (i and j flip)
    folder = root / task
    for sub, array in (("imagesTr", ct), ("labelsTr", label_view.astype(np.uint8))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)[::-1, ::-1]), affine),
                 str(folder / sub / f"{name}.nii.gz"))
    meta = folder / "dataset.json"
    cases = json.loads(meta.read_text())["training"] if meta.is_file() else []
    cases.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta.write_text(json.dumps({"training": cases}))


class OracleModel:
    """`generate_batch` as the real model has it: answers the 3-step question of each slice from a predicted label
    map (1 organ, 2 lesion) and a Ref-Seg question with the organ; `contradict` names one slice's lesion another
    diagnosis' abnormality beside that organ (the bundled sample's slice 9)."""

    def __init__(self):
        self.slices, self.asked = {}, []

    def add(self, image_path, predicted, organ, diagnosis, contradict=None):
        view, _ = volumes.load_view(image_path)
        for i in range(view.shape[0]):
            key = to_unit_range(view[i].astype(np.float32), "ct").tobytes()
            self.slices[key] = (predicted[i], organ, diagnosis, i == contradict)

    def eval(self):
        return self

    def generate_batch(self, images, questions, max_new_tokens=96):
        replies = []
        for image, question in zip(images, questions):
            predicted, organ, diagnosis, contradict = self.slices[np.asarray(image, np.float32).tobytes()]
            self.asked.append(question)
            organ_mask, lesion = predicted >= 1, predicted == 2
            if question != templates.DEFAULT_QUESTION:
                replies.append(Reply(templates.refseg_answer(organ), [Segment(organ, organ_mask)]))
            elif not lesion.any():
                replies.append(Reply(templates.NEGATIVE_ANSWER))
            elif contradict:
                other = np.zeros_like(lesion)
                other[-6:, :6] = True
                replies.append(Reply(templates.vqaseg_answer(True, "Pancreas tumour", ["pancreas", "pancreas tumour"]),
                                     [Segment("pancreas", other), Segment("pancreas tumour", lesion)]))
            else:
                replies.append(Reply(templates.vqaseg_answer(True, diagnosis, [organ, f"{organ} tumour"]),
                                     [Segment(organ, organ_mask), Segment(f"{organ} tumour", lesion)]))
        return replies


@pytest.fixture
def phantoms(tmp_path, monkeypatch):
    """Three volumes: a liver with a 0.80 mL tumour (found, one slice of it answered 'Pancreas tumour'), a 0.05 mL
    tumour (missed) and a false lesion in the liver; a normal liver; a pancreas with a 0.64 mL tumour (found)."""
    organ = box((2, 12), (4, 32), (4, 36))
    big, small, false = box((4, 9), (8, 18), (8, 18)), box((9, 11), (24, 28), (26, 30)), box((8, 10), (26, 30), (8, 12))
    liver_truth = organ * 1 + (big | small)
    liver_pred = organ * 1 + (big | false)
    pancreas = box((3, 10), (10, 26), (12, 30))
    lesion = box((5, 10), (14, 22), (16, 26))
    data, model = tmp_path / "data", OracleModel()
    for task, name, truth, predicted, organ_name, diagnosis, contradict, seed in (
            ("Task03_Liver", "liver_0", liver_truth, liver_pred, "liver", "Liver tumour", 6, 1),
            ("Task07_Pancreas", "pancreas_0", pancreas * 1 + lesion, pancreas * 1 + lesion, "pancreas",
             "Pancreas tumour", None, 2),
            ("Task03_Liver", "liver_1", organ * 1, organ * 1, "liver", "Liver tumour", None, 3)):
        write_case(data, task, name, truth, seed)
        model.add(data / task / "imagesTr" / f"{name}.nii.gz", predicted, organ_name, diagnosis, contradict)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setattr("raddiagseg.model.load_model", lambda path: model)
    return {"data": data, "model": model, "root": tmp_path,
            "ml": {"big": big.sum() * VOXEL_ML, "small": small.sum() * VOXEL_ML, "lesion": lesion.sum() * VOXEL_ML}}


def test_score_volumes_reports_every_metric_of_the_issue(phantoms, capsys):
    out = phantoms["root"] / "report" / "volumes.json"
    code = cli.main(["score-volumes", "--model", str(phantoms["root"] / "model"), "--data", str(phantoms["data"]),
                     "--out", str(out), "--batch-size", "4", "--compare-skip"])
    assert code == 0
    report = json.loads(out.read_text())
    summary, records = report["summary"], {r["volume"]: r for r in report["volumes"]}
    assert set(records) == {"liver_0.nii.gz", "pancreas_0.nii.gz", "liver_1.nii.gz"}
    assert phantoms["ml"]["big"] >= volumes.LARGE_ML > phantoms["ml"]["small"] and phantoms["ml"]["lesion"] >= volumes.LARGE_ML

    # volume level: both abnormal volumes found with their diagnosis, the normal one normal
    assert summary["detection"] == {"tp": 2, "fp": 0, "fn": 0, "tn": 1} and summary["detection_f1"] == 1.0
    assert summary["diagnosis_f1"] == 1.0
    # lesion level: big and the pancreas tumour found, the small one missed; the false lesion is a wrong finding
    assert (summary["lesions"], summary["lesions_large"], summary["predicted_lesions"]) == (3, 2, 3)
    assert summary["lesion_recall"] == pytest.approx(2 / 3) and summary["lesion_recall_large"] == 1.0
    assert summary["lesion_precision"] == pytest.approx(2 / 3)
    liver = records["liver_0.nii.gz"]
    assert [m["found"] for m in sorted(liver["lesions"], key=lambda m: -m["truth_ml"])] == [True, False]
    # 3D Dice per target: the organ is exact (its lesions included), the liver's lesions are not
    big, small, false = 500, 32, 32
    assert liver["dice"] == {"liver": 1.0, "liver tumour": pytest.approx(2 * big / (2 * big + small + false))}
    assert summary["dice_by_target"] == {"liver": 1.0, "liver tumour": pytest.approx(2 * big / (2 * big + small + false), abs=1e-3),
                                         "pancreas": 1.0, "pancreas tumour": 1.0}
    # measurements of a lesion found exactly: no error; the organ's volume likewise
    assert summary["median_volume_error_pct"] == 0.0 and summary["median_diameter_error_mm"] == 0.0
    assert summary["median_organ_volume_error_pct"] == 0.0
    found = next(m for m in liver["lesions"] if m["found"])
    assert found["truth_ml"] == found["predicted_ml"] == pytest.approx(phantoms["ml"]["big"], abs=1e-3)
    assert found["truth_diameter_mm"] == pytest.approx(np.linalg.norm([9 * 0.8, 9 * 0.8, 4 * 2.5]), abs=0.051)
    # the slice answered "Pancreas tumour" contradicts nothing in the volume answer
    assert summary["volumes_with_contradictions"] == 0 and liver["renamed"] == 1 and liver["discarded"] >= 1
    assert "pancreas" not in liver["answer"] and "liver tumour 1 of 2" in liver["answer"]
    # slice skipping: slice 0 (air) never asked, fewer slices answered, same findings
    assert summary["findings_unchanged"] == 3 and summary["slices_answered"] < summary["slices_total"] == 3 * 14
    assert records["liver_1.nii.gz"]["answered_slices"] <= 7
    # the table printed and written next to the JSON states the targets
    table = out.with_suffix(".md").read_text()
    assert table.strip() in capsys.readouterr().out and "| detection_f1 | 1.000 | >= 0.95 |" in table
    assert "| volumes_with_contradictions | 0 | <= 0 |" in table and "| median_volume_error_pct | 0.000 | <= 20.0 |" in table


def test_score_volumes_without_msd_folders_says_what_to_make(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    code = cli.main(["score-volumes", "--model", str(tmp_path / "model"), "--data", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "no Task03_Liver or Task07_Pancreas folder" in err and "raddiagseg phantoms" in err
