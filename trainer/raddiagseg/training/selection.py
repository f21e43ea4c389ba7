"""Which of two models is better: one definition for the trainer (which checkpoint becomes `best/`) and the
MONAI Label app (whether a retrained model is published).

A score report (`evaluate_model`, `raddiagseg score`) holds metrics per modality; the score of a stage is the
mean of its metrics per modality, then over modalities, so a modality with few rows weighs as much as one with
many. `regressions` compares two reports metric by metric, per modality, against a tolerance; `drop_bounds` gives the
upper confidence bound of each drop from the two models' per-row results on the set they were compared on, so that the
comparison is decided on what the drop could be, not on one noisy number.
"""

import numpy as np

# Validation metrics of each stage. Finetune: the VQA-Seg answer (detection, diagnosis, masks) and Ref-Seg masks
# (the app's train task learns both); a metric a report lacks (no rows of its task) is left out.
STAGE_METRICS = {
    "finetune": ("detection_f1", "diagnosis_f1", "dice_org", "dice_abn", "refseg_dice"),
    "pretrain": ("refseg_dice",),
}


def metric_name(stage):
    return f"mean({', '.join(STAGE_METRICS[stage])})"


def per_modality(report, metrics):
    """{modality: {metric: value or None}} for the modalities of a report (its `overall` entry left out)."""
    return {
        modality: {key: values.get(key) for key in metrics}
        for modality, values in report.items()
        if modality != "overall" and isinstance(values, dict)
    }


def selection_score(report, stage="finetune"):
    """Mean of the stage's metrics per modality (metrics without samples skipped), then over modalities; or None."""
    means = []
    for values in per_modality(report, STAGE_METRICS[stage]).values():
        present = [float(v) for v in values.values() if v is not None]
        if present:
            means.append(sum(present) / len(present))
    return sum(means) / len(means) if means else None


def regressions(served, candidate, tolerance, stage="finetune", bounds=None):
    """Where `candidate` may be more than `tolerance` below `served`: [{modality, metric, served, candidate, delta,
    and with bounds upper_drop, drop, rows}] (served/candidate: the reports' values). Without `bounds` the observed drop is compared; with `bounds` (`drop_bounds`) the drop on the rows
    both models were scored on and its upper confidence bound, so a candidate whose drop could exceed the tolerance on
    another sample counts as worse.

    A metric the served model has and the candidate lacks (e.g. Dice with no true-positive masks left) counts as 0
    for the candidate, unless `bounds` say that no row has it for both models (a Dice over cases only one of them
    diagnosed correctly compares nothing: the diagnosis F1 carries that change); a modality only one report has is
    compared against nothing and never counts as worse.
    """
    metrics = STAGE_METRICS[stage]
    theirs, mine = per_modality(served, metrics), per_modality(candidate, metrics)
    worse = []
    for modality in sorted(set(theirs) & set(mine)):
        for key in metrics:
            old, new = theirs[modality][key], mine[modality][key]
            if old is None:
                continue
            new = 0.0 if new is None else float(new)
            bound = ((bounds or {}).get(modality) or {}).get(key)
            if bound and bound["upper"] is None:
                continue
            drop = max(bound["drop"], bound["upper"]) if bound else float(old) - new
            if drop > tolerance + 1e-9:
                entry = {"modality": modality, "metric": key, "served": round(float(old), 4),
                         "candidate": round(new, 4), "delta": round(new - float(old), 4)}
                if bound:  # what was decided on: the drop on the rows compared (for Dice, both diagnosed right)
                    entry.update(upper_drop=round(drop, 4), drop=bound["drop"], rows=bound.get("rows"))
                worse.append(entry)
    return worse


BOOTSTRAP_DRAWS = 400  # paired bootstrap draws: the 95th percentile of a drop is stable to ~0.003
CONFIDENCE = 0.95


def _common_dice(served, candidate):
    """One row's two records, their VQA-Seg Dice values kept only where both models have them: Dice is scored on
    correctly diagnosed rows (c = 1), so a Dice change is measured on the cases both diagnosed, and a diagnosis that
    changed counts once, in the diagnosis F1."""
    if served.get("task") == "vqaseg" and not (served.get("dice") and candidate.get("dice")):
        return {**served, "dice": []}, {**candidate, "dice": []}
    return served, candidate


def drop_bounds(served_records, candidate_records, stage="finetune", draws=BOOTSTRAP_DRAWS, confidence=CONFIDENCE,
                seed=0):
    """{modality: {metric: {"drop", "upper", "std", "rows"}}}: how far each metric of the candidate falls below the
    served model's (served - candidate) on these rows, its one-sided `confidence` upper bound and its standard
    deviation, by a paired bootstrap: rows drawn with replacement within each modality, the same rows for both models
    (per-row records of `evaluate_model`, paired by id). VQA-Seg Dice is compared on the rows both models diagnosed
    correctly (`rows`: how many; with none, drop and upper are None: nothing to compare). The upper bound is what the
    drop could be on another sample of the same distribution: two models that answer every row alike have 0, one
    diagnosis flip among 56 X-rays about 0.04. A modality with fewer than 2 paired rows has no bound (its observed drop
    is all there is)."""
    from raddiagseg.evaluation.scoring import summarise

    metrics = STAGE_METRICS[stage]
    theirs = {r["id"]: r for r in served_records}
    rng = np.random.default_rng(seed)
    bounds = {}
    for modality in sorted({r["modality"] for r in candidate_records}):
        pairs = [_common_dice(theirs[r["id"]], r) for r in candidate_records
                 if r["modality"] == modality and r["id"] in theirs]
        if len(pairs) < 2:
            continue
        old_all, new_all = summarise([p[0] for p in pairs]), summarise([p[1] for p in pairs])
        rows = _metric_rows(pairs)
        drops = {key: [] for key in metrics}
        for _ in range(draws):
            sample = [pairs[i] for i in rng.integers(0, len(pairs), len(pairs))]
            old, new = summarise([p[0] for p in sample]), summarise([p[1] for p in sample])
            for key in metrics:
                if old.get(key) is not None:
                    drops[key].append(old[key] - (new.get(key) or 0.0))
        bounds[modality] = {}
        for key, values in drops.items():
            if old_all.get(key) is not None and len(values) > 1:
                bounds[modality][key] = {"drop": round(old_all[key] - (new_all.get(key) or 0.0), 4),
                                         "upper": round(float(np.quantile(values, confidence)), 4),
                                         "std": round(float(np.std(values)), 4), "rows": rows[key]}
            elif key.startswith("dice_") and rows[key] == 0:
                bounds[modality][key] = {"drop": None, "upper": None, "std": None, "rows": 0}
    return bounds


def _metric_rows(pairs):
    """{metric: rows of `pairs` that count in it}: VQA-Seg rows for F1, rows with Dice of a role for Dice."""
    vqaseg = [old for old, _ in pairs if old.get("task") == "vqaseg"]
    roles = {"dice_org": "organ", "dice_abn": "abnormality"}
    rows = {"detection_f1": len(vqaseg), "diagnosis_f1": len(vqaseg),
            "refseg_dice": sum(old.get("task") == "refseg" for old, _ in pairs)}
    rows.update({key: sum(any(d[1] == role for d in old.get("dice") or ()) for old in vqaseg) for key, role in roles.items()})
    return rows
