"""Which of two models is better: one definition for the trainer (which checkpoint becomes `best/`) and the
MONAI Label app (whether a retrained model is published).

A score report (`evaluate_model`, `raddiagseg score`) holds metrics per modality; the score of a stage is the
mean of its metrics per modality, then over modalities, so a modality with few rows weighs as much as one with
many. `regressions` compares two reports metric by metric, per modality, against a tolerance.
"""

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


def regressions(served, candidate, tolerance, stage="finetune"):
    """Where `candidate` scores more than `tolerance` below `served`: [{modality, metric, served, candidate, delta}].

    A metric the served model has and the candidate lacks (e.g. Dice with no true-positive masks left) counts as 0
    for the candidate; a modality only one report has is compared against nothing and never counts as worse.
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
            if new < float(old) - tolerance:
                worse.append({"modality": modality, "metric": key, "served": round(float(old), 4),
                              "candidate": round(new, 4), "delta": round(new - float(old), 4)})
    return worse
