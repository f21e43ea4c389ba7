"""Scoring predictions against a manifest: RadDiagSeg-D (paper 001 appendix), Ref-Seg, VQA and gIoU/cIoU.

Per sample, `score_sample` returns one flat record (what the per-sample CSV shows, with every
parse and scoring decision in `notes`); `summarise` turns records into the report's metrics for
one group (a modality, or all). Hierarchy of the 3-step task, as in the paper:

* detection: step 1 read as yes/no; unreadable = wrong (FN when GT is abnormal, FP when normal);
* c (diagnosis correct) = GT negative and predicted negative, or GT positive, predicted positive
  and the GT diagnosis named in the predicted diagnosis text;
* Dice-Org / Dice-Abn: only for samples with GT positive and c = 1, one Dice per GT target,
  the predicted mask chosen by the label written before its seg token (name or synonym); a
  target no mask names scores 0.

gIoU / cIoU (paper 003) ignore the text hierarchy: every GT target of every GT-positive 3-step
sample and every Ref-Seg sample, against the mask the answer names for it (empty if none).

Reasoning segmentation (`reasonseg`, paper 002) is reported apart, M3DS-style, overall and per
subset (the row's `subset`, by default its source): gIoU, cIoU of the answer's mask and accuracy =
the answer resolved the implicit instruction to the right target (its seg token's label, or the
answer text, names the target).
"""

import re
from pathlib import Path

import numpy as np

from raddiagseg import templates, vocabulary
from raddiagseg.answers import parse_answer, read_yes_no
from raddiagseg.evaluation import metrics
from raddiagseg.evaluation.files import BenchmarkInputError, read_mask

AMPUTATED_KEYS = ("detection", "diagnosis", "segmentation")
SCORED_TASKS = ("vqaseg", "refseg", "vqa", "reasonseg")


# ---------------------------------------------------------------------------------------------
# diagnosis matching


def _diagnosis_entries():
    return vocabulary.load()["diagnoses"]


def diagnosis_names(label, synonyms=True):
    """The texts that count as naming GT diagnosis `label`: the label, plus its vocabulary synonyms."""
    names = [label]
    if synonyms:
        for entry in _diagnosis_entries():
            if entry["label"].lower() == label.lower():
                names += entry["synonyms"]
    return names


def _occurrences(name, text):
    pattern = r"(?<![\w-])" + re.escape(name.lower()) + r"(?![\w-])"
    return [(m.start(), m.end()) for m in re.finditer(pattern, text)]


def diagnosis_named(gt_label, text, synonyms=True):
    """(True/False, how): does the predicted diagnosis text name the GT diagnosis?

    The paper's rule: the GT label appears in the text, case-insensitive (substring). With
    `synonyms` (default), one of the label's vocabulary synonyms also counts when it stands as
    whole words and is not part of a longer name of another diagnosis ("covid infection" inside
    "non-covid infection" does not name COVID-19 infection).
    """
    if not text:
        return False, "no diagnosis text"
    low = " ".join(text.lower().split())
    if gt_label.lower() in low:
        return True, f"GT label {gt_label!r} found"
    if not synonyms:
        return False, f"GT label {gt_label!r} not found (strict rule: synonyms not accepted)"
    others = [
        (name.lower(), span)
        for entry in _diagnosis_entries()
        if entry["label"].lower() != gt_label.lower()
        for name in [entry["label"], *entry["synonyms"]]
        for span in _occurrences(name, low)
    ]
    for synonym in diagnosis_names(gt_label)[1:]:
        for start, end in _occurrences(synonym, low):
            inside = [n for n, (s, e) in others if s <= start and end <= e and e - s > end - start]
            if not inside:
                return True, f"synonym {synonym!r} of {gt_label!r} found"
    return False, f"neither {gt_label!r} nor its synonyms found"


# ---------------------------------------------------------------------------------------------
# masks of one prediction


class PredictedMasks:
    """The masks of one prediction record: token -> a path (relative to the prediction file) or an array."""

    def __init__(self, record, root):
        masks = record.get("masks") or {}
        if not isinstance(masks, dict):
            raise BenchmarkInputError(f"prediction {record.get('id')!r}: 'masks' must be an object token -> file")
        self.masks, self.root = masks, root
        self.unreadable = 0

    def has(self, token):
        return token in self.masks

    def load(self, token, shape, notes):
        """The bool mask for `token`, or None (with a note) when absent or unreadable; a wrong size is an error."""
        value = self.masks.get(token)
        if value is None:
            notes.append(f"no mask given for {token}")
            return None
        if isinstance(value, str):
            path = self.root / value
            try:
                mask = read_mask(path)
            except BenchmarkInputError as exc:
                notes.append(f"mask for {token} unreadable ({exc}): scored as missing")
                self.unreadable += 1
                return None
            where = str(path)
        elif hasattr(value, "shape"):
            mask, where = np.asarray(value, bool), f"in-memory mask {token}"
        else:
            notes.append(f"mask for {token} is neither a file path nor an array ({value!r}): scored as missing")
            self.unreadable += 1
            return None
        if mask.shape != tuple(shape):
            raise BenchmarkInputError(
                f"{where}: mask size {_size(mask.shape)} differs from the GT mask {_size(shape)}; "
                "write masks at the image's size"
            )
        return mask


def _size(shape):
    """'W x H' as image viewers print it."""
    return "x".join(str(n) for n in reversed(tuple(shape)))


def _gt_mask(row, target):
    """The GT mask of a manifest target (path relative to the manifest's folder)."""
    if not target.get("mask"):
        raise BenchmarkInputError(f"manifest row {row['id']!r}: target {target.get('name')!r} has no mask")
    return read_mask(Path(row["_base"]) / target["mask"])


def match_targets(targets, segments, notes):
    """{target index: token} choosing, for each GT target, the first unused segment whose label names it."""
    chosen, used = {}, set()
    for i, target in enumerate(targets):
        for label, token in segments:
            if token not in used and vocabulary.matches_target(label, target["name"]):
                chosen[i] = token
                used.add(token)
                notes.append(f"{token} ({label!r}) scored against GT target {target['name']!r}")
                break
    for label, token in segments:
        if token not in used:
            notes.append(f"{token} ({label!r}) names no GT target of this sample: not scored")
    return chosen


# ---------------------------------------------------------------------------------------------
# per-sample scoring


def _base_record(row):
    return {
        "id": row["id"],
        "task": row["task"],
        "modality": row.get("modality") or "unknown",
        "source": row.get("source"),
    }


def score_vqaseg(row, record, root, synonyms=True, amputated=False):
    """One 3-step sample: detection, c, Dice per target (only when GT positive and c = 1), IoU overlaps."""
    out, notes = _base_record(row), []
    masks = PredictedMasks(record, root)
    if amputated:
        answers = record.get("answers")
        if not isinstance(answers, dict):
            raise BenchmarkInputError(
                f"prediction {row['id']!r} has no 'answers' object; --amputated expects "
                '{"answers": {"detection": ..., "diagnosis": ..., "segmentation": ...}}'
            )
        step1 = parse_answer(answers.get("detection") or "")
        detection = step1.detection
        notes += [f"detection answer: {n}" for n in step1.notes]
        diagnosis_text = " ".join(str(answers.get("diagnosis") or "").split()) or None
        notes.append(f"diagnosis answer taken whole: {diagnosis_text!r}")
        seg_answer = parse_answer(answers.get("segmentation") or "")
        segments = seg_answer.segments
        notes += [f"segmentation answer: {n}" for n in seg_answer.notes if n.startswith("<seg")]
        out["answer"] = " || ".join(f"{k}: {answers.get(k)}" for k in AMPUTATED_KEYS)
    else:
        parsed = parse_answer(record.get("answer"))
        detection, diagnosis_text, segments = parsed.detection, parsed.diagnosis, parsed.segments
        notes += parsed.notes
        out["answer"] = record.get("answer")

    gt_positive = bool(row.get("detection"))
    gt_diagnosis = row.get("diagnosis")
    out.update(gt_detection=gt_positive, pred_detection=detection, gt_diagnosis=gt_diagnosis, pred_diagnosis=diagnosis_text)
    out["detection_readable"] = detection is not None
    # an unreadable step 1 is wrong whichever way the GT goes
    out["detection_for_f1"] = detection if detection is not None else (not gt_positive)
    out["detection_correct"] = detection is not None and detection == gt_positive

    if not gt_positive:
        c = detection is False
        notes.append("c = 1: GT and prediction negative" if c else "c = 0: GT negative, prediction not negative")
    elif detection is not True:
        c = False
        notes.append("c = 0: GT positive, detection not yes (evaluation stops)")
    elif not gt_diagnosis:
        c = True
        notes.append("c = 1: GT positive without a diagnosis label, so detection alone decides")
    else:
        c, how = diagnosis_named(gt_diagnosis, diagnosis_text, synonyms)
        notes.append(f"c = {int(c)}: {how}")
    out["c"] = int(c)

    targets = row.get("targets") or []
    out["dice"], out["overlaps"] = [], []
    if gt_positive and targets:
        chosen = match_targets(targets, segments, notes)
        for i, target in enumerate(targets):
            gt = _gt_mask(row, target)
            pred = masks.load(chosen[i], gt.shape, notes) if i in chosen else None
            overlap = metrics.overlap(pred, gt) if pred is not None else (0, 0, int(gt.sum()))
            out["overlaps"].append(overlap)
            if c:
                value = metrics.dice_from_overlap(*overlap)
                if pred is None:
                    value = 0.0
                    notes.append(f"GT target {target['name']!r} has no predicted mask: Dice 0")
                out["dice"].append((target["name"], target.get("role", "organ"), value))
        if not c:
            notes.append("Dice not counted: c = 0")
    out["unreadable_masks"] = masks.unreadable
    out["notes"] = notes
    return out


def score_refseg(row, record, root):
    """One Ref-Seg sample: Dice and IoU of the answer's mask against the single GT target."""
    out, notes = _base_record(row), []
    masks = PredictedMasks(record, root)
    parsed = parse_answer(record.get("answer"))
    notes += [n for n in parsed.notes if n.startswith("<seg")]
    out["answer"] = record.get("answer")
    target = (row.get("targets") or [None])[0]
    if target is None:
        raise BenchmarkInputError(f"manifest row {row['id']!r}: a refseg row needs one target")
    token = next((t for _, t in parsed.segments if masks.has(t)), None)
    if token is None and masks.has(templates.SEG_TOKENS[0]):
        token = templates.SEG_TOKENS[0]
        notes.append(f"answer names no seg token with a mask: using the mask given for {token}")
    gt = _gt_mask(row, target)
    pred = masks.load(token, gt.shape, notes) if token else None
    if pred is None:
        notes.append("no predicted mask: Dice 0")
    overlap = metrics.overlap(pred, gt) if pred is not None else (0, 0, int(gt.sum()))
    out["overlaps"] = [overlap]
    out["dice"] = [(target["name"], "refseg", metrics.dice_from_overlap(*overlap) if pred is not None else 0.0)]
    out["unreadable_masks"] = masks.unreadable
    out["notes"] = notes
    return out


def score_reasonseg(row, record, root):
    """One reasoning-segmentation sample: the Ref-Seg overlap plus whether the answer named the right target."""
    out = score_refseg(row, record, root)
    out["subset"] = row.get("subset") or row.get("source") or "all"
    target = row["targets"][0]["name"]
    parsed = parse_answer(record.get("answer"))
    labels = [label for label, _ in parsed.segments]
    named = any(vocabulary.matches_target(label, target) for label in labels)
    if not named and isinstance(record.get("answer"), str):  # "…: liver." before a bare seg token
        words = vocabulary.normalise_label(record["answer"])
        named = any(f" {vocabulary.normalise_label(n)} " in f" {words} " for n in vocabulary.target_names(target))
    out["target_correct"] = bool(named)
    out["notes"].append(f"target {target!r} {'named' if named else 'not named'} by the answer (labels {labels})")
    return out


def score_vqa(row, record):
    """One VQA sample: token recall / F1 (MultiMedEval); closed questions also yes/no accuracy."""
    out, notes = _base_record(row), []
    gt, pred = str(row.get("answer") or ""), record.get("answer")
    out["answer"] = pred
    answer_type = row.get("answer_type") or ("closed" if gt.strip().lower() in ("yes", "no") else "open")
    out["answer_type"] = answer_type
    recall, f1 = metrics.token_recall_f1(pred, gt)
    out.update(vqa_recall=recall, vqa_f1=f1)
    if answer_type == "closed":
        gt_yes, _ = read_yes_no(gt, []) if gt.strip().lower().strip(".") in ("yes", "no") else (None, "")
        if gt_yes is not None:  # yes/no question: the answer's yes/no decides
            pred_yes, _ = read_yes_no(pred or "", notes)
            out["closed_correct"] = pred_yes is not None and pred_yes == gt_yes
        else:  # a choice ("left", "CT"): every GT word must be in the answer
            out["closed_correct"] = recall == 1.0
            notes.append("closed question with a non-yes/no answer: right when every GT word is in the answer")
    notes.append(f"token recall {recall:.3f}, F1 {f1:.3f} against {gt!r}")
    out["notes"] = notes
    return out


def score_sample(row, record, root, synonyms=True, amputated=False):
    task = row["task"]
    if task == "vqaseg":
        return score_vqaseg(row, record, root, synonyms, amputated)
    if task == "refseg":
        return score_refseg(row, record, root)
    if task == "vqa":
        return score_vqa(row, record)
    if task == "reasonseg":
        return score_reasonseg(row, record, root)
    return None


# ---------------------------------------------------------------------------------------------
# aggregation


def summarise(records):
    """The report's metrics for one group of per-sample records (None where a metric has no samples)."""
    vqaseg = [r for r in records if r["task"] == "vqaseg"]
    refseg = [r for r in records if r["task"] == "refseg"]
    vqa = [r for r in records if r["task"] == "vqa"]
    reason = [r for r in records if r["task"] == "reasonseg"]
    out = {"n": len(vqaseg)}
    if vqaseg:
        y_true = [r["gt_detection"] for r in vqaseg]
        y_pred = [r["detection_for_f1"] for r in vqaseg]
        precision, recall, f1 = metrics.precision_recall_f1(y_true, y_pred)
        c = [r["c"] for r in vqaseg]
        out.update(
            n_positive=int(sum(y_true)),
            n_negative=len(y_true) - int(sum(y_true)),
            n_unreadable=sum(not r["detection_readable"] for r in vqaseg),
            detection_f1=f1,
            detection_precision=precision,
            detection_recall=recall,
            detection_acc=metrics.mean([r["detection_correct"] for r in vqaseg]),
            diagnosis_f1=metrics.correctness_f1(c),
            diagnosis_acc=metrics.mean(c),
        )
    else:
        out.update(
            {k: None for k in ("detection_f1", "detection_precision", "detection_recall", "diagnosis_f1", "diagnosis_acc")}
        )
    for role, key in (("organ", "org"), ("abnormality", "abn")):
        values = [d for r in vqaseg for (_, rl, d) in r["dice"] if rl == role]
        out[f"dice_{key}"], out[f"n_dice_{key}"] = metrics.mean(values), len(values)
    overlaps = [o for r in vqaseg + refseg for o in r["overlaps"]]
    out["giou"], out["ciou"] = metrics.giou_ciou(overlaps)
    out["n_iou"] = len(overlaps)
    out["n_refseg"] = len(refseg)
    out["refseg_dice"] = metrics.mean([d for r in refseg for (_, _, d) in r["dice"]])
    out.update(reasonseg_metrics(reason))
    subsets = sorted({r["subset"] for r in reason})
    out["reasonseg_subsets"] = {s: reasonseg_metrics([r for r in reason if r["subset"] == s]) for s in subsets} if reason else {}
    closed = [r for r in vqa if r["answer_type"] == "closed"]
    open_ = [r for r in vqa if r["answer_type"] != "closed"]
    out.update(
        n_vqa=len(vqa),
        n_vqa_closed=len(closed),
        n_vqa_open=len(open_),
        vqa_f1=metrics.mean([r["vqa_f1"] for r in vqa]),
        vqa_recall=metrics.mean([r["vqa_recall"] for r in vqa]),
        vqa_closed_f1=metrics.mean([r["vqa_f1"] for r in closed]),
        vqa_closed_recall=metrics.mean([r["vqa_recall"] for r in closed]),
        vqa_closed_acc=metrics.mean([r["closed_correct"] for r in closed]),
        vqa_open_recall=metrics.mean([r["vqa_recall"] for r in open_]),
        vqa_open_acc=metrics.mean([r["vqa_recall"] >= metrics.OPEN_ACCURACY_RECALL for r in open_]),
    )
    return out


def reasonseg_metrics(records):
    """gIoU, cIoU and target accuracy of reasoning-segmentation records (None without samples)."""
    giou, ciou = metrics.giou_ciou([o for r in records for o in r["overlaps"]])
    return {"n_reasonseg": len(records), "reasonseg_giou": giou, "reasonseg_ciou": ciou,
            "reasonseg_acc": metrics.mean([r["target_correct"] for r in records])}


def build_report(records, settings=None):
    """{modality: metrics, ..., "overall": metrics + settings} from per-sample records."""
    report = {}
    for modality in sorted({r["modality"] for r in records}):
        report[modality] = summarise([r for r in records if r["modality"] == modality])
    report["overall"] = {**summarise(records), **(settings or {})}
    return report


def score(rows, predictions, root, synonyms=True, amputated=False, progress=False):
    """Score every manifest row that has a prediction. Returns (report, per-sample records).

    `predictions`: id -> record ({"answer" | "answers", "masks"}); `root`: the folder mask paths
    are relative to. Rows without a prediction are counted in `overall.n_missing`; rows of tasks
    the benchmark does not score in `overall.n_skipped`.
    """
    root = Path(root)
    records, missing, skipped = [], 0, 0
    iterator = rows
    if progress:
        from tqdm import tqdm

        iterator = tqdm(rows, desc="score", unit="sample")
    for row in iterator:
        record = predictions.get(row["id"])
        if record is None:
            missing += 1
            continue
        scored = score_sample(row, record, root, synonyms, amputated)
        if scored is None:
            skipped += 1
            continue
        records.append(scored)
    return build_report(records, run_settings(missing, skipped, synonyms, amputated)), records


def run_settings(missing=0, skipped=0, synonyms=True, amputated=False):
    """The `overall` entries that say how a report was made."""
    return {
        "n_missing": missing,
        "n_skipped": skipped,
        "diagnosis_rule": "label or vocabulary synonym" if synonyms else "label (paper)",
        "amputated": bool(amputated),
    }
