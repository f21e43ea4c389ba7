"""Diagnosis chain-of-thought answers and reasoning segmentation (issue 10): templates from the ground truth,
parser and scorer reading the conclusion, `reasonseg` rows in the builder, dataset and scorer (gIoU/cIoU/acc per subset)."""

import json

import numpy as np
import pytest

from raddiagseg import templates, vocabulary
from raddiagseg.answers import parse_answer
from raddiagseg.data.builder import build_phantom_dataset
from raddiagseg.data.dataset import ManifestDataset
from raddiagseg.data.records import read_manifest
from raddiagseg.evaluation import scoring
from raddiagseg.evaluation.report import markdown


def test_cot_answer_reasons_modality_finding_diagnosis_then_concludes():
    answer = templates.vqaseg_cot_answer(True, "xray", "COVID-19 infection", ["lung", "infection"])
    reasoning, conclusion = answer.split(templates.COT_CONCLUSION)
    assert reasoning.index("chest X-ray") < reasoning.index("opacities") < reasoning.index("COVID-19 infection")
    assert conclusion.strip() == templates.vqaseg_answer(True, "COVID-19 infection", ["lung", "infection"])
    negative = templates.vqaseg_cot_answer(False, "ct")
    assert "no abnormality" in negative and negative.endswith(templates.NEGATIVE_ANSWER)


@pytest.mark.parametrize("text, detection, diagnosis, n_segments", [
    (templates.vqaseg_cot_answer(True, "ct", "Liver tumour", ["liver", "liver tumour"]), True, "Liver tumour", 2),
    # the reasoning names another diagnosis and says "no": only the conclusion counts
    ("Modality: CT scan.\nFinding: no pancreas tumour, 1. no mass there.\nConclusion:\n1. Yes\n2. Liver tumour", True, "Liver tumour", 0),
    (templates.vqaseg_cot_answer(False, "ct"), False, None, 0),
    ("Reasoning: lesion seen. **Final answer:** yes, liver tumour", True, "liver tumour", 0),
    ("Modality: CT scan.\nFinding: a focal lesion", None, None, 0),  # cut before concluding: unreadable, not guessed
])
def test_parser_reads_the_conclusion(text, detection, diagnosis, n_segments):
    parsed = parse_answer(text)
    assert (parsed.detection, parsed.diagnosis, len(parsed.segments)) == (detection, diagnosis, n_segments)
    assert parsed.reasoning and "Modality" in parsed.reasoning or "Reasoning" in parsed.reasoning
    assert parse_answer("1. Yes\n2. Liver tumour").reasoning is None


def test_reasonseg_templates_describe_without_naming():
    for target, entry in vocabulary.targets().items():
        assert vocabulary.implicit_descriptions(target), f"{target} has implicit descriptions"
        if entry["role"] == "organ":  # abnormalities may say "where the infection is" (issue 10's example)
            for description in vocabulary.implicit_descriptions(target):
                assert target not in description.lower(), (target, description)
    answer = templates.reasonseg_answer("the organ that stores glycogen", "liver")
    assert parse_answer(answer).segments == [("liver", "<seg000>")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("reason")
    manifest = build_phantom_dataset(out, ct_volumes=4, xrays=12, seed=5, ct_size=96, ct_slices=8, xray_size=96,
                                     vqa_images=0, refseg_images=3, reasonseg=True)
    return manifest, read_manifest(manifest)


def test_builder_writes_reasonseg_rows_per_segmented_target(built):
    _, rows = built
    reason = [r for r in rows if r["task"] == "reasonseg"]
    assert reason, "reasonseg=True adds rows"
    by_id = {r["id"]: r for r in rows}
    targets = {r["targets"][0]["name"] for r in reason}
    assert {"liver", "lung", "infection"} <= targets
    for r in reason:
        source = by_id[r["id"].split("__reason_")[0]]
        assert r["split"] == source["split"] and r["image"] == source["image"]  # no leak across splits
        name = r["targets"][0]["name"]
        assert r["description"] in vocabulary.implicit_descriptions(name) and r["description"] in r["question"]
        assert r["answer"].endswith(templates.refseg_answer(name)) and r["subset"] == r["source"]
    assert len({(r["image"], r["targets"][0]["name"]) for r in reason}) == len(reason)


def test_dataset_serves_cot_and_reasonseg_samples(built):
    manifest, _ = built
    cot = ManifestDataset(manifest, split=None, tasks=["vqaseg"], cot=True, synonym_prob=0.0)
    plain = ManifestDataset(manifest, split=None, tasks=["vqaseg"])
    i = next(k for k, r in enumerate(cot.rows) if r["detection"])
    sample = cot[i]
    assert sample["question"] == templates.COT_QUESTION and templates.COT_CONCLUSION in sample["answer"]
    parsed = parse_answer(sample["answer"])
    assert parsed.detection is True and parsed.diagnosis == cot.rows[i]["diagnosis"]
    assert len(sample["masks"]) == len(parsed.segments)  # one mask per seg token, CoT or not
    assert templates.COT_CONCLUSION not in plain[i]["answer"]
    reason = ManifestDataset(manifest, split=None, tasks=["reasonseg"], synonym_prob=0.0)
    questions = {reason[0]["question"] for _ in range(12)}
    assert len(questions) > 1  # a fresh description / wording per visit
    s = reason[0]
    assert parse_answer(s["answer"]).segments[0][0] == reason.rows[0]["targets"][0]["name"] and len(s["masks"]) == 1


def _prediction(row, answer, mask):
    return {"id": row["id"], "answer": answer, "masks": {"<seg000>": mask}}


def test_scorer_reasonseg_giou_ciou_accuracy_per_subset_and_cot_conclusion(built):
    manifest, rows = built
    base = manifest.parent
    reason = [dict(r, _base=str(base)) for r in rows if r["task"] == "reasonseg"]
    from raddiagseg.evaluation.files import read_mask

    predictions, expected = {}, {}
    for k, row in enumerate(reason):
        gt = read_mask(base / row["targets"][0]["mask"])
        name = row["targets"][0]["name"]
        if k % 2 == 0:  # right target, exact mask
            predictions[row["id"]] = _prediction(row, templates.reasonseg_answer(row["description"], name), gt)
            expected[row["id"]] = (True, (int(gt.sum()), int(gt.sum()), int(gt.sum())))
        else:  # wrong target, empty mask
            wrong = "spleen" if name != "spleen" else "liver"
            predictions[row["id"]] = _prediction(row, templates.refseg_answer(wrong), np.zeros_like(gt))
            expected[row["id"]] = (False, (0, 0, int(gt.sum())))
    report, records = scoring.score(reason, predictions, base)
    overall = report["overall"]
    assert overall["n_reasonseg"] == len(reason)
    assert overall["reasonseg_acc"] == pytest.approx(np.mean([e[0] for e in expected.values()]))
    ious = [1.0 if e[0] else 0.0 for e in expected.values()]
    assert overall["reasonseg_giou"] == pytest.approx(np.mean(ious))
    inter = sum(e[1][0] for e in expected.values())
    union = sum(e[1][1] + e[1][2] - e[1][0] for e in expected.values())
    assert overall["reasonseg_ciou"] == pytest.approx(inter / union)
    subsets = overall["reasonseg_subsets"]
    assert set(subsets) == {r["source"] for r in reason}
    assert sum(s["n_reasonseg"] for s in subsets.values()) == len(reason)
    assert "## Reasoning segmentation" in markdown(report)
    json.dumps(report)  # the report stays JSON

    # a CoT answer whose reasoning mentions "no" is scored by its conclusion
    vq = next(dict(r, _base=str(base)) for r in rows if r["task"] == "vqaseg" and r["detection"])
    labels = [t["name"] for t in vq["targets"]]
    answer = templates.vqaseg_cot_answer(True, vq["modality"], vq["diagnosis"], labels)
    masks = {templates.SEG_TOKENS[i]: read_mask(base / t["mask"]) for i, t in enumerate(vq["targets"])}
    rep, recs = scoring.score([vq], {vq["id"]: {"id": vq["id"], "answer": answer, "masks": masks}}, base)
    assert recs[0]["c"] == 1 and rep["overall"]["dice_org"] == 1.0
