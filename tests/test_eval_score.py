"""`raddiagseg score` on a small hand-made benchmark whose every metric was computed by hand.

8×8 masks. CT (NIfTI): liver = rows 0-3 (32 px), liver tumour = rows 0-1 × cols 0-3 (8 px).
X-ray (PNG): lung = cols 0-3 (32 px), infection = rows 0-1 × cols 0-1 (4 px).
"""

import csv
import json

import nibabel
import numpy as np
import pytest
from PIL import Image

from raddiagseg.cli import main
from raddiagseg.data.io import VIEW_SLICE_AFFINE

N = 8


def box(rows, cols):
    mask = np.zeros((N, N), np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return mask


LIVER, TUMOUR = box((0, 4), (0, 8)), box((0, 2), (0, 4))
LUNG, INFECTION = box((0, 8), (0, 4)), box((0, 2), (0, 2))
HALF_TUMOUR = box((0, 2), (0, 2))  # 4 px inside the 8 px tumour: Dice 2·4/(4+8) = 2/3
HALF_LIVER = box((0, 2), (0, 8))  # 16 px inside the 32 px liver: Dice 2/3, IoU 1/2
EMPTY = np.zeros((N, N), np.uint8)

CT_TARGETS = [("liver", "organ", LIVER), ("liver tumour", "abnormality", TUMOUR)]
XR_TARGETS = [("lung", "organ", LUNG), ("infection", "abnormality", INFECTION)]

# id -> (modality, task, GT detection, GT diagnosis, targets, predicted answer, {token: predicted mask})
SAMPLES = {
    # right detection + diagnosis; organ exact (Dice 1), tumour half (Dice 2/3)
    "ct_ok": ("ct", "vqaseg", True, "Liver tumour", CT_TARGETS,
              "1. Yes\n2. Liver tumour\n3. Segmentation masks:\n- liver <seg000>\n- liver tumour <seg001>",
              {"<seg000>": LIVER, "<seg001>": HALF_TUMOUR}),
    # GT negative answered yes: detection FP, c = 0, no Dice
    "ct_neg_yes": ("ct", "vqaseg", False, None, [], "1. Yes. 2. There is a liver tumour", {}),
    "ct_neg_no": ("ct", "vqaseg", False, None, [], "1. No", {}),
    # unreadable step 1 on a positive: FN, c = 0
    "ct_unreadable": ("ct", "vqaseg", True, "Liver tumour", CT_TARGETS, "1. Maybe\n2. Liver tumour", {}),
    # right detection, wrong diagnosis: c = 0, no Dice even though the liver mask is perfect
    "ct_wrong_diag": ("ct", "vqaseg", True, "Liver tumour", CT_TARGETS,
                      "1. Yes\n2. Pancreas tumour\n3. Segmentation mask:\n- liver <seg000>", {"<seg000>": LIVER}),
    # swapped tokens: <seg000> is labelled tumour and holds the tumour: both Dice 1; diagnosis by synonym
    "ct_swapped": ("ct", "vqaseg", True, "Liver tumour", CT_TARGETS,
                   "1) yes.\n2) hepatic tumour.\n3) - liver tumour <seg000>\n- liver <seg001>",
                   {"<seg000>": TUMOUR, "<seg001>": LIVER}),
    # correct diagnosis but no masks: Dice 0 counted for both targets
    "ct_no_masks": ("ct", "vqaseg", True, "Liver tumour", CT_TARGETS, "1. Yes\n2. Liver tumour", {}),
    # inline answer without step numbers; infection named by synonym "opacity", predicted empty: Dice 0
    "xr_inline": ("xray", "vqaseg", True, "COVID-19 infection", XR_TARGETS,
                  "Yes, there is COVID-19 infection. lung <seg000>, opacity <seg001>",
                  {"<seg000>": LUNG, "<seg001>": EMPTY}),
    # GT negative, unreadable: FP
    "xr_unreadable": ("xray", "vqaseg", False, None, [], "I cannot tell from this image.", {}),
    # "Non-COVID infection" must not count as naming COVID-19 infection
    "xr_noncovid": ("xray", "vqaseg", True, "COVID-19 infection", XR_TARGETS, "1. Yes\n2. Non-COVID infection", {}),
    "ct_ref": ("ct", "refseg", None, None, [("liver", "organ", LIVER)], "Here is the mask for liver <seg000>.",
               {"<seg000>": HALF_LIVER}),
    "xr_ref": ("xray", "refseg", None, None, [("lung", "organ", LUNG)], "Here is the mask for lung.", {}),
    "vqa_closed": ("ct", "vqa", None, None, [], "Yes, it is.", {}),
    "vqa_open": ("ct", "vqa", None, None, [], "the left lung", {}),
    "vqa_open_wrong": ("ct", "vqa", None, None, [], "kidney", {}),
}
VQA_GT = {"vqa_closed": ("yes", "closed"), "vqa_open": ("left lung", "open"), "vqa_open_wrong": ("liver", "open")}


def write_mask(path, mask, nifti):
    path.parent.mkdir(parents=True, exist_ok=True)
    if nifti:
        nibabel.save(nibabel.Nifti1Image(mask.astype(np.uint8), VIEW_SLICE_AFFINE), str(path))  # as the builder stores
    else:
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)


@pytest.fixture()
def bench(tmp_path):
    """A manifest + a prediction file (standard format) for SAMPLES; returns (manifest, pred)."""
    data, run = tmp_path / "data", tmp_path / "run"
    rows, preds = [], []
    for sid, (modality, task, det, diag, targets, answer, masks) in SAMPLES.items():
        nifti = modality == "ct"
        ext = ".nii.gz" if nifti else ".png"
        row = {"id": sid, "task": task, "source": "test", "modality": modality, "split": "test",
               "image": f"images/{sid}{ext}", "detection": det, "diagnosis": diag, "targets": []}
        for name, role, mask in targets:
            rel = f"masks/{sid}_{name.replace(' ', '_')}{ext}"
            write_mask(data / rel, mask, nifti)
            row["targets"].append({"name": name, "role": role, "mask": rel})
        if sid in VQA_GT:
            row["answer"], row["answer_type"] = VQA_GT[sid]
        rows.append(row)
        pred = {"id": sid, "answer": answer, "masks": {}}
        for token, mask in masks.items():
            rel = f"masks/{sid}_{token.strip('<>')}.png"
            write_mask(run / rel, mask, nifti=False)
            pred["masks"][token] = rel
        preds.append(pred)
    manifest = data / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pred_file = run / "pred.jsonl"
    pred_file.write_text("".join(json.dumps(p) + "\n" for p in preds))
    return manifest, pred_file


def run_score(manifest, pred, *extra):
    out = pred.parent / "report.json"
    rc = main(["score", "--pred", str(pred), "--data", str(manifest), "--out", str(out), *extra])
    return rc, out


def test_report_metrics_match_hand_computed_values(bench):
    rc, out = run_score(*bench)
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report) == {"ct", "xray", "overall"}
    ct, xr, overall = report["ct"], report["xray"], report["overall"]

    # CT detection: TP ct_ok, ct_wrong_diag, ct_swapped, ct_no_masks; FP ct_neg_yes; FN ct_unreadable; TN ct_neg_no
    assert ct["n"] == 7 and ct["n_positive"] == 5 and ct["n_unreadable"] == 1
    assert ct["detection_precision"] == pytest.approx(4 / 5)
    assert ct["detection_recall"] == pytest.approx(4 / 5)
    assert ct["detection_f1"] == pytest.approx(0.8)
    # c = 1 for ct_ok, ct_neg_no, ct_swapped (synonym), ct_no_masks: 4 of 7; F1 vs ones = 2a/(1+a)
    assert ct["diagnosis_acc"] == pytest.approx(4 / 7)
    assert ct["diagnosis_f1"] == pytest.approx(8 / 11)
    # Dice only for c = 1 positives: organ 1 (ct_ok), 1 (swapped), 0 (no masks); tumour 2/3, 1, 0
    assert ct["n_dice_org"] == 3 and ct["dice_org"] == pytest.approx(2 / 3)
    assert ct["n_dice_abn"] == 3 and ct["dice_abn"] == pytest.approx(5 / 9)
    # gIoU / cIoU over every GT mask of CT positives (ungated) + the CT Ref-Seg sample: 11 masks
    assert ct["n_iou"] == 11
    assert ct["giou"] == pytest.approx(5 / 11)
    assert ct["ciou"] == pytest.approx(124 / 232)
    assert ct["n_refseg"] == 1 and ct["refseg_dice"] == pytest.approx(2 / 3)

    # X-ray: TP xr_inline, xr_noncovid; FP xr_unreadable (GT negative, unreadable)
    assert xr["detection_precision"] == pytest.approx(2 / 3)
    assert xr["detection_recall"] == pytest.approx(1.0)
    assert xr["detection_f1"] == pytest.approx(0.8)
    assert xr["diagnosis_acc"] == pytest.approx(1 / 3)
    assert xr["diagnosis_f1"] == pytest.approx(0.5)
    assert xr["dice_org"] == pytest.approx(1.0) and xr["dice_abn"] == pytest.approx(0.0)
    assert xr["giou"] == pytest.approx(1 / 5)
    assert xr["ciou"] == pytest.approx(32 / 104)
    assert xr["refseg_dice"] == pytest.approx(0.0)

    # overall pools the samples (not a mean of modalities)
    assert overall["n"] == 10
    assert overall["detection_f1"] == pytest.approx(12 / 15)
    assert overall["diagnosis_acc"] == pytest.approx(0.5)
    assert overall["diagnosis_f1"] == pytest.approx(2 / 3)
    assert overall["dice_org"] == pytest.approx(3 / 4) and overall["n_dice_org"] == 4
    assert overall["dice_abn"] == pytest.approx(5 / 12) and overall["n_dice_abn"] == 4
    assert overall["refseg_dice"] == pytest.approx(1 / 3)
    assert overall["n_missing"] == 0

    # VQA (MultiMedEval): token F1 0.5 / 0.8 / 0, recall 1 / 1 / 0; open accuracy = recall >= 0.75
    assert overall["n_vqa"] == 3
    assert overall["vqa_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert overall["vqa_recall"] == pytest.approx(2 / 3)
    assert overall["vqa_closed_acc"] == pytest.approx(1.0)
    assert overall["vqa_closed_f1"] == pytest.approx(0.5)
    assert overall["vqa_closed_recall"] == pytest.approx(1.0)
    assert overall["vqa_open_recall"] == pytest.approx(0.5)
    assert overall["vqa_open_acc"] == pytest.approx(0.5)


def test_strict_diagnosis_rule_rejects_synonyms(bench):
    rc, out = run_score(*bench, "--strict-diagnosis")
    assert rc == 0
    ct = json.loads(out.read_text())["ct"]
    # ct_swapped wrote "hepatic tumour": c = 0 under the paper's label-only rule
    assert ct["diagnosis_acc"] == pytest.approx(3 / 7)
    assert ct["diagnosis_f1"] == pytest.approx(0.6)
    assert ct["dice_org"] == pytest.approx(0.5) and ct["n_dice_org"] == 2
    assert ct["dice_abn"] == pytest.approx(1 / 3)


def test_csv_markdown_and_plot_are_written(bench):
    rc, out = run_score(*bench)
    assert rc == 0
    rows = {r["id"]: r for r in csv.DictReader(out.with_suffix(".csv").open())}
    assert set(rows) == set(SAMPLES)
    assert "detection unreadable" in rows["ct_unreadable"]["notes"]
    assert "c = 0" in rows["ct_wrong_diag"]["notes"] and rows["ct_wrong_diag"]["dice_org"] == ""
    assert "<seg000> ('liver tumour') scored against GT target 'liver tumour'" in rows["ct_swapped"]["notes"]
    assert rows["ct_no_masks"]["dice_per_target"] == "liver=0.0000; liver tumour=0.0000"
    assert float(rows["ct_ok"]["dice_abn"]) == pytest.approx(2 / 3)
    assert float(rows["ct_ref"]["refseg_dice"]) == pytest.approx(2 / 3) and rows["ct_ref"]["dice_org"] == ""
    table = out.with_suffix(".md").read_text()
    header = table.splitlines()[2]
    assert header.startswith("| Model | X-ray Detection F1 | X-ray Diagnosis F1 | X-ray Dice-Org | X-ray Dice-Abn | CT Detection F1")
    assert "| run | 0.800 | 0.500 | 1.000 | 0.000 | 0.800 | 0.727 | 0.667 | 0.556 |" in table
    png = out.with_name("report_dice.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.size[0] > 300


def test_comparison_table_keeps_one_row_per_model(bench, tmp_path):
    manifest, pred = bench
    table = tmp_path / "table3.md"
    for name in ("model-a", "model-b", "model-a"):
        assert main(["score", "--pred", str(pred), "--data", str(manifest), "--name", name, "--table", str(table)]) == 0
    rows = [line for line in table.read_text().splitlines() if line.startswith("| model-")]
    assert [r.split(" | ")[0] for r in rows] == ["| model-a", "| model-b"]
    assert rows[0].endswith("| 0.800 | 0.500 | 1.000 | 0.000 | 0.800 | 0.727 | 0.667 | 0.556 |")


def test_amputated_predictions(bench, tmp_path):
    manifest, _ = bench
    run = tmp_path / "amp"
    write_mask(run / "masks/a_seg000.png", LIVER, nifti=False)
    write_mask(run / "masks/a_seg001.png", TUMOUR, nifti=False)
    lines = [
        {"id": "ct_ok", "answers": {"detection": "Yes, there is an abnormality.", "diagnosis": "A hepatic neoplasm.",
                                    "segmentation": "The liver <seg000> and the liver tumour <seg001>."},
         "masks": {"<seg000>": "masks/a_seg000.png", "<seg001>": "masks/a_seg001.png"}},
        {"id": "ct_neg_no", "answers": {"detection": "no", "diagnosis": "Liver tumour", "segmentation": ""}, "masks": {}},
        {"id": "ct_unreadable", "answers": {"detection": "Liver tumour.", "diagnosis": "Liver tumour",
                                            "segmentation": ""}, "masks": {}},
    ]
    pred = run / "pred.jsonl"
    pred.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc, out = run_score(manifest, pred, "--amputated")
    assert rc == 0
    ct = json.loads(out.read_text())["ct"]
    assert ct["n"] == 3
    # TP ct_ok, TN ct_neg_no, FN ct_unreadable ("Liver tumour." is not yes/no)
    assert ct["detection_f1"] == pytest.approx(2 / 3)
    assert ct["diagnosis_acc"] == pytest.approx(2 / 3) and ct["diagnosis_f1"] == pytest.approx(0.8)
    assert ct["dice_org"] == pytest.approx(1.0) and ct["dice_abn"] == pytest.approx(1.0)
    assert "| amp\\* | 0.667 | 0.800 | 1.000 | 1.000 |" in out.with_suffix(".md").read_text()
    # a standard-format line under --amputated is a clear error
    rc, _ = run_score(*bench, "--amputated")
    assert rc == 2


def test_bad_input_gives_one_line_errors(bench, tmp_path, capsys):
    manifest, pred = bench
    rc, _ = run_score(manifest, tmp_path / "missing.jsonl")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not found" in err and len(err.splitlines()) == 1

    stray = tmp_path / "stray" / "pred.jsonl"
    stray.parent.mkdir()
    stray.write_text(json.dumps({"id": "nobody", "answer": "1. No", "masks": {}}) + "\n")
    rc, _ = run_score(manifest, stray)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not in the manifest" in err and "'nobody'" in err

    broken = tmp_path / "broken" / "pred.jsonl"
    broken.parent.mkdir()
    broken.write_text('{"id": "ct_ok", "answer": "1. Yes"}\n{"id": \n')
    rc, _ = run_score(manifest, broken)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "line 2 is not valid JSON" in err


def test_wrong_size_mask_is_an_error_naming_the_file(bench, capsys):
    manifest, pred = bench
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(pred.parent / "masks/ct_ok_seg000.png")
    rc, _ = run_score(manifest, pred)
    err = capsys.readouterr().err
    assert rc == 2 and "ct_ok_seg000.png" in err and "6x4" in err and "8x8" in err


def test_unreadable_mask_scores_as_missing_with_a_note(bench):
    manifest, pred = bench
    (pred.parent / "masks/ct_ok_seg001.png").write_bytes(b"not a png")
    rc, out = run_score(manifest, pred)
    assert rc == 0
    rows = {r["id"]: r for r in csv.DictReader(out.with_suffix(".csv").open())}
    assert "unreadable" in rows["ct_ok"]["notes"]
    assert float(rows["ct_ok"]["dice_abn"]) == 0.0
    assert json.loads(out.read_text())["ct"]["dice_abn"] == pytest.approx((0 + 1 + 0) / 3)


def test_mask_entry_that_is_not_a_path_is_noted(bench):
    manifest, pred = bench
    lines = [json.loads(line) for line in pred.read_text().splitlines()]
    for line in lines:
        if line["id"] == "ct_ok":
            line["masks"]["<seg000>"] = 3
    pred.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc, out = run_score(manifest, pred)
    assert rc == 0
    rows = {r["id"]: r for r in csv.DictReader(out.with_suffix(".csv").open())}
    assert "neither a file path nor an array" in rows["ct_ok"]["notes"] and float(rows["ct_ok"]["dice_org"]) == 0.0


def test_missing_predictions_are_counted_not_scored(bench):
    manifest, pred = bench
    lines = [line for line in pred.read_text().splitlines() if '"ct_ok"' not in line]
    pred.write_text("\n".join(lines) + "\n")
    rc, out = run_score(manifest, pred)
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["overall"]["n_missing"] == 1 and report["ct"]["n"] == 6
