"""Which of two models is better: one definition for the trainer (which checkpoint becomes `best/`) and the
MONAI Label app (whether a retrained model is published).

A score report (`evaluate_model`, `raddiagseg score`) holds metrics per modality; the score of a stage is the
mean of its metrics per modality, then over modalities, so a modality with few rows weighs as much as one with
many. `regressions` compares two reports metric by metric, per modality, against a tolerance; `noise_tolerances`
measures that tolerance from the two models' per-row results on the set they were compared on.
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


def regressions(served, candidate, tolerance, stage="finetune", tolerances=None):
    """Where `candidate` scores more than its tolerance below `served`: [{modality, metric, served, candidate, delta,
    tolerance}]. The tolerance is `tolerances[modality][metric]` where given (`noise_tolerances`), else `tolerance`.

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
            allowed = ((tolerances or {}).get(modality) or {}).get(key, tolerance)
            if new < float(old) - allowed:
                worse.append({"modality": modality, "metric": key, "served": round(float(old), 4),
                              "candidate": round(new, 4), "delta": round(new - float(old), 4),
                              "tolerance": round(float(allowed), 4)})
    return worse


NOISE_DRAWS = 300  # bootstrap draws: the std of a 0.02-sized noise is stable to ~0.002


def paired_noise(served_records, candidate_records, stage="finetune", draws=NOISE_DRAWS, seed=0):
    """{modality: {metric: std}}: the bootstrap standard deviation of (candidate - served) for each metric, rows drawn
    with replacement within each modality and the same rows for both models (per-row records of `evaluate_model`,
    paired by id). It is how much the comparison would move on another sample of the same distribution."""
    from raddiagseg.evaluation.scoring import summarise

    metrics = STAGE_METRICS[stage]
    theirs = {r["id"]: r for r in served_records}
    rng = np.random.default_rng(seed)
    noise = {}
    for modality in sorted({r["modality"] for r in candidate_records}):
        pairs = [(theirs[r["id"]], r) for r in candidate_records if r["modality"] == modality and r["id"] in theirs]
        if len(pairs) < 2:
            continue
        deltas = {key: [] for key in metrics}
        for _ in range(draws):
            sample = [pairs[i] for i in rng.integers(0, len(pairs), len(pairs))]
            old, new = summarise([p[0] for p in sample]), summarise([p[1] for p in sample])
            for key in metrics:
                if old.get(key) is not None:
                    deltas[key].append((new.get(key) or 0.0) - old[key])
        noise[modality] = {key: round(float(np.std(v)), 4) for key, v in deltas.items() if len(v) > 1}
    return noise


def noise_tolerances(noise, floor, cap, z):
    """{modality: {metric: min(cap, max(floor, z x std))}} from `paired_noise`: a drop within the noise of the
    comparison is not a regression, one beyond `cap` always is."""
    return {modality: {key: round(min(cap, max(floor, z * std)), 4) for key, std in values.items()}
            for modality, values in noise.items()}
