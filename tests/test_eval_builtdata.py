"""The scorer on a RadDiagSeg-D build from phantoms: GT answers score perfectly, and known mistakes cost what they should."""

import json

import pytest

from raddiagseg.cli import main

pytest.importorskip("raddiagseg.data.phantoms")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    src, out = root / "src", root / "ds"
    assert main(["phantoms", "--out", str(src), "--ct-volumes", "4", "--xrays", "6", "--ct-size", "64",
                 "--ct-slices", "8", "--xray-size", "64", "--vqa-images", "4"]) == 0
    assert main(["build", "--out", str(out), "--msd", str(src / "Task03_Liver"), str(src / "Task07_Pancreas"),
                 "--covidqu", str(src / "COVID-QU-Ex"), "--vqarad", str(src / "VQA_RAD" / "VQA_RAD Dataset Public.json"),
                 "--min-organ-pixels", "20", "--min-tumour-pixels", "5"]) == 0
    manifest = out / "manifest.jsonl"
    return manifest, [json.loads(line) for line in manifest.read_text().splitlines()]


def write_pred(path, rows, answer_of, masks_of):
    path.write_text("".join(json.dumps({"id": r["id"], "answer": answer_of(r), "masks": masks_of(r)}) + "\n" for r in rows))


def gt_masks(row):  # GT mask files, relative to the manifest folder = the prediction folder here
    return {f"<seg{i:03d}>": t["mask"] for i, t in enumerate(row["targets"])}


def score(manifest, pred, *extra):
    out = pred.with_suffix(".report.json")
    assert main(["score", "--pred", str(pred), "--data", str(manifest), "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_ground_truth_answers_score_perfectly(built):
    manifest, rows = built
    pred = manifest.parent / "oracle.jsonl"
    write_pred(pred, rows, lambda r: r["answer"], gt_masks)
    report = score(manifest, pred)
    overall = report["overall"]
    assert overall["n"] == sum(r["task"] == "vqaseg" for r in rows) > 0
    for key in ("detection_f1", "diagnosis_f1", "diagnosis_acc", "dice_org", "dice_abn", "giou", "ciou", "refseg_dice",
                "vqa_recall", "vqa_closed_acc", "vqa_open_acc"):
        assert overall[key] == pytest.approx(1.0), key
    assert {"ct", "xray"} <= set(report)


def test_swapped_tokens_still_score_by_label(built):
    manifest, rows = built
    positives = [r for r in rows if r["task"] == "vqaseg" and len(r["targets"]) == 2]

    def swapped_answer(r):
        organ, abnormality = (t["name"] for t in r["targets"])
        return f"1. Yes\n2. {r['diagnosis']}\n3. Segmentation masks:\n- {abnormality} <seg000>\n- {organ} <seg001>"

    pred = manifest.parent / "swapped.jsonl"
    write_pred(pred, positives, swapped_answer,
               lambda r: {"<seg000>": r["targets"][1]["mask"], "<seg001>": r["targets"][0]["mask"]})
    overall = score(manifest, pred)["overall"]
    assert overall["dice_org"] == pytest.approx(1.0) and overall["dice_abn"] == pytest.approx(1.0)
    # same masks under the wrong labels: every counted Dice is that of organ vs abnormality, < 1
    wrong = manifest.parent / "wrong.jsonl"
    write_pred(wrong, positives, swapped_answer, gt_masks)
    assert score(manifest, wrong)["overall"]["dice_org"] < 0.9


def test_always_no_detects_nothing(built):
    manifest, rows = built
    three_step = [r for r in rows if r["task"] == "vqaseg"]
    pred = manifest.parent / "no.jsonl"
    write_pred(pred, three_step, lambda r: "1. No", lambda r: {})
    overall = score(manifest, pred)["overall"]
    negatives = sum(not r["detection"] for r in three_step)
    assert overall["detection_f1"] == 0.0 and overall["detection_recall"] == 0.0
    assert overall["diagnosis_acc"] == pytest.approx(negatives / len(three_step))
    assert overall["dice_org"] is None and overall["n_dice_org"] == 0
