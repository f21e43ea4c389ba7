"""`raddiagseg score-volumes`: the whole-volume benchmark on MSD-layout volumes with ground-truth labels.

Each volume is answered as the app answers it (`raddiagseg.findings.answer_volume`: slice answers
combined into 3D findings) and compared with its label file (1 organ, 2 tumour):

- volume level: detection F1 (abnormal = the label has tumour voxels) and diagnosis F1 (paper 001's
  definition: c = 1 when both are normal, or both abnormal with the task's diagnosis);
- lesion level: every 3D connected component of the tumour label is a lesion; it is found when a
  predicted lesion overlaps it. Recall over all lesions and over lesions >= 0.5 mL; precision = share
  of predicted lesions overlapping a true one;
- 3D Dice of the organ (organ + its lesions, as the label) and of the lesions, on abnormal volumes, overall
  and per target (liver, liver tumour, pancreas, pancreas tumour);
- measurement error of each found lesion against the lesion it overlaps most: volume in % and max
  diameter in mm (both measured the same way, `findings.measure`); and of the organ's volume in %;
- contradictions: segments or lesions naming another organ or abnormality than the volume's diagnosis.

`--compare-skip` answers every volume twice, with and without slice skipping, and reports the time
saved and whether any finding changed.
"""

import json
import logging
import time
from pathlib import Path

import numpy as np

from raddiagseg import findings, templates
from raddiagseg.data.io import load_volume_lps

log = logging.getLogger(__name__)

TASKS = {"Task03_Liver": "Liver tumour", "Task07_Pancreas": "Pancreas tumour"}
LARGE_ML = 0.5
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
VIEW_TO_LPS_INDEX = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)  # (k, r, c) -> (c, r, k)


def list_volumes(data, max_volumes=None):
    """[(image path, label path, diagnosis of the task)] from the MSD task folders under `data`, alternating tasks."""
    per_task = []
    for folder, diagnosis in TASKS.items():
        meta = Path(data) / folder / "dataset.json"
        if meta.is_file():
            cases = json.loads(meta.read_text())["training"]
            per_task.append([(meta.parent / c["image"], meta.parent / c["label"], diagnosis) for c in cases])
    if not per_task:
        raise FileNotFoundError(f"{data} holds no {' or '.join(TASKS)} folder with a dataset.json "
                                "(make one with `raddiagseg phantoms --out DIR`)")
    mixed = [case for group in zip(*per_task) for case in group]
    longest = max(per_task, key=len)
    mixed += longest[len(mixed) // len(per_task):]
    return mixed[:max_volumes] if max_volumes else mixed


def load_view(path):
    """View array (slices inferior->superior, rows anterior->posterior, cols right->left) and its voxel->LPS matrix."""
    data, affine = load_volume_lps(path)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), RAS_TO_LPS @ affine @ VIEW_TO_LPS_INDEX


def model_asker(model, batch_size=8, max_new_tokens=96, window=None):
    """`ask` for `findings.answer_volume` running `model.generate_batch` on view slices of a HU volume."""
    import torch

    from raddiagseg.imaging import to_unit_range

    def bind(volume):
        def ask(indices, question, advance):
            out = []
            with torch.inference_mode():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start : start + batch_size]
                    images = [to_unit_range(volume[i].astype(np.float32), "ct", window) for i in chunk]
                    out += model.generate_batch(images, [question] * len(chunk), max_new_tokens=max_new_tokens)
                    advance(len(chunk))
            return out

        return ask

    return bind


def dice(a, b):
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else None


def score_volume(volume_answer, label, view_to_lps, diagnosis):
    """Per-volume record: truth, prediction, lesion matches, Dice, contradictions."""
    truth_positive = bool((label == 2).any())
    numbers = list(range(label.shape[0]))
    truth_lesions = [(c, findings.measure(c, view_to_lps, numbers)) for c in findings.components(label == 2)]
    entry = findings.diagnosis_entry(volume_answer.diagnosis) or {}
    allowed = {entry.get("organ"), entry.get("abnormality")} - {None}
    pairs = [(f, m) for f, m in zip(volume_answer.findings, volume_answer.finding_masks) if f["role"] == "abnormality"]
    predicted, lesion_masks = [f for f, _ in pairs], [m for _, m in pairs]
    matches = []
    for mask, truth in truth_lesions:
        overlaps = [int((mask & m).sum()) for m in lesion_masks]
        best = int(np.argmax(overlaps)) if overlaps and max(overlaps) > 0 else None
        match = {"truth_ml": truth["volume_ml"], "truth_diameter_mm": truth["max_diameter_mm"], "found": best is not None}
        if best is not None:
            found = predicted[best]
            match.update(predicted_ml=found["volume_ml"], predicted_diameter_mm=found["max_diameter_mm"],
                         volume_error_pct=100.0 * abs(found["volume_ml"] - truth["volume_ml"]) / truth["volume_ml"],
                         diameter_error_mm=abs(found["max_diameter_mm"] - truth["max_diameter_mm"]))
        matches.append(match)
    true_union = label == 2
    precise = sum(bool((m & true_union).any()) for m in lesion_masks)
    truth_entry = findings.diagnosis_entry(diagnosis) or {}
    organ_name, lesion_name = truth_entry.get("organ"), truth_entry.get("abnormality")
    pred_organ = volume_answer.masks.get(organ_name)
    pred_lesion = volume_answer.masks.get(lesion_name, np.zeros_like(true_union))
    dice_organ = (dice(pred_organ, label >= 1) if pred_organ is not None else 0.0) if truth_positive else None
    dice_lesion = dice(pred_lesion, true_union) if truth_positive else None
    organ_found = next((f for f in volume_answer.findings if f["name"] == organ_name), None)
    organ_ml = findings.volume_ml(label >= 1, view_to_lps)
    contradictions = [name for name in volume_answer.masks if allowed and name not in allowed]
    contradictions += [f"{f['name']} in {f['organ']}" for f in predicted if entry and f["organ"] != entry.get("organ")]
    return {
        "truth": {"detection": truth_positive, "diagnosis": diagnosis if truth_positive else None,
                  "lesions": len(truth_lesions)},
        "predicted": {"detection": volume_answer.detection, "diagnosis": volume_answer.diagnosis, "lesions": len(predicted)},
        "lesions": matches,
        "predicted_lesions_on_truth": precise,
        "dice_organ": dice_organ,
        "dice_lesion": dice_lesion,
        "dice": {organ_name: dice_organ, lesion_name: dice_lesion} if truth_positive else {},
        "organ_volume_error_pct": 100.0 * abs(organ_found["volume_ml"] - organ_ml) / organ_ml
        if organ_found and organ_ml else None,
        "contradictions": contradictions,
        "discarded": len(volume_answer.summary["discarded"]),
        "renamed": len(volume_answer.summary["renamed"]),
    }


def f1(tp, fp, fn):
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


def summarise(records):
    """Benchmark numbers over per-volume records (see the module docstring)."""
    tp = sum(r["truth"]["detection"] and r["predicted"]["detection"] for r in records)
    fp = sum(not r["truth"]["detection"] and r["predicted"]["detection"] for r in records)
    fn = sum(r["truth"]["detection"] and not r["predicted"]["detection"] for r in records)
    correct = [r["truth"]["detection"] == r["predicted"]["detection"]
               and (not r["truth"]["detection"] or r["predicted"]["diagnosis"] == r["truth"]["diagnosis"]) for r in records]
    accuracy = sum(correct) / len(records) if records else None
    lesions = [m for r in records for m in r["lesions"]]
    large = [m for m in lesions if m["truth_ml"] >= LARGE_ML]
    found = [m for m in lesions if m["found"]]
    predicted = sum(r["predicted"]["lesions"] for r in records)

    def mean(values):
        values = [v for v in values if v is not None]
        return round(float(np.mean(values)), 3) if values else None

    def median(values):
        return round(float(np.median(values)), 2) if values else None

    return {
        "volumes": len(records),
        "abnormal_volumes": sum(r["truth"]["detection"] for r in records),
        "detection_f1": f1(tp, fp, fn),
        "detection": {"tp": tp, "fp": fp, "fn": fn, "tn": len(records) - tp - fp - fn},
        "diagnosis_acc": accuracy,
        "diagnosis_f1": 2 * accuracy / (1 + accuracy) if accuracy is not None else None,
        "lesions": len(lesions),
        "lesion_recall": len(found) / len(lesions) if lesions else None,
        "lesions_large": len(large),
        "lesion_recall_large": sum(m["found"] for m in large) / len(large) if large else None,
        "predicted_lesions": predicted,
        "lesion_precision": sum(r["predicted_lesions_on_truth"] for r in records) / predicted if predicted else None,
        "dice_organ": mean(r["dice_organ"] for r in records),
        "dice_lesion": mean(r["dice_lesion"] for r in records),
        "dice_by_target": {name: mean(r["dice"][name] for r in records if name in r.get("dice", {}))
                           for name in dict.fromkeys(n for r in records for n in r.get("dice", {}))},
        "median_volume_error_pct": median([m["volume_error_pct"] for m in found]),
        "median_diameter_error_mm": median([m["diameter_error_mm"] for m in found]),
        "median_organ_volume_error_pct": median([r["organ_volume_error_pct"] for r in records
                                                 if r.get("organ_volume_error_pct") is not None]),
        "volumes_with_contradictions": sum(bool(r["contradictions"]) for r in records),
    }


def same_findings(a, b):
    """True when two answers of one volume state the same findings (names, slice ranges, volumes to 1 %)."""
    if (a.detection, a.diagnosis, len(a.findings)) != (b.detection, b.diagnosis, len(b.findings)):
        return False
    for x, y in zip(a.findings, b.findings):
        if (x["name"], x["slices"]) != (y["name"], y["slices"]):
            return False
        if abs(x["volume_ml"] - y["volume_ml"]) > 0.01 * max(x["volume_ml"], y["volume_ml"], 1e-6):
            return False
    return True


def run_benchmark(model, data, max_volumes=None, batch_size=8, max_new_tokens=96, compare_skip=False, progress=True):
    """(summary, per-volume records): every volume answered with slice skipping (and without, with compare_skip)."""
    bind = model_asker(model, batch_size=batch_size, max_new_tokens=max_new_tokens)
    records = []
    for image_path, label_path, diagnosis in list_volumes(data, max_volumes):
        volume, view_to_lps = load_view(image_path)
        label, _ = load_view(label_path)
        ask = bind(volume)
        runs = {}
        for skip in ((True, False) if compare_skip else (True,)):
            start = time.perf_counter()
            answer, results = findings.answer_volume(ask, volume.shape, view_to_lps, templates.DEFAULT_QUESTION, "ct",
                                                     in_body=findings.body_slices(volume), skip=skip)
            runs[skip] = (answer, time.perf_counter() - start, len(results))
        answer, seconds, answered = runs[True]
        record = {"volume": Path(image_path).name, "slices": int(volume.shape[0]), "seconds": round(seconds, 2),
                  "answered_slices": answered, **score_volume(answer, label, view_to_lps, diagnosis),
                  "answer": answer.answer_text()}
        if compare_skip:
            full, full_seconds, _ = runs[False]
            record.update(seconds_no_skip=round(full_seconds, 2), findings_unchanged=same_findings(answer, full))
        records.append(record)
        if progress:
            log.info("%s: %s, %d lesion(s) of %d found, %.1f s", record["volume"], answer.diagnosis or "normal",
                     sum(m["found"] for m in record["lesions"]), len(record["lesions"]), seconds)
    summary = summarise(records)
    summary["seconds"] = round(sum(r["seconds"] for r in records), 1)
    if compare_skip:
        summary["seconds_no_skip"] = round(sum(r["seconds_no_skip"] for r in records), 1)
        summary["findings_unchanged"] = sum(r["findings_unchanged"] for r in records)
        summary["slices_answered"] = sum(r["answered_slices"] for r in records)
        summary["slices_total"] = sum(r["slices"] for r in records)
    return summary, records


TARGETS = (("detection_f1", ">=", 0.95), ("lesion_recall_large", ">=", 0.90), ("median_volume_error_pct", "<=", 20.0),
           ("volumes_with_contradictions", "<=", 0))


def markdown(summary):
    """A small markdown table of the summary against the issue's targets."""
    lines = ["| metric | value | target |", "|---|---|---|"]
    targets = {key: f"{op} {value}" for key, op, value in TARGETS}
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.3f}"
        lines.append(f"| {key} | {value} | {targets.get(key, '')} |")
    return "\n".join(lines)
