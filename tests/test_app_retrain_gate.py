"""The retraining gate and the one model-selection score: which candidate may replace the served model, the replay
mix, the reference set a model folder carries, and how the Slicer Retrain panel reports the check."""

import json

import pytest
from app_studies import DEMO_MODEL
from RadDiagLib import gate_report, training_progress

pytest.importorskip("raddiagseg.training")
from lib import model_store  # noqa: E402
from raddiagseg.training import reference, selection  # noqa: E402


def report(ct=None, xray=None):
    full = {"detection_f1": 0.9, "diagnosis_f1": 0.9, "dice_org": 0.85, "dice_abn": 0.75, "refseg_dice": 0.8}
    out = {"overall": {"n": 10, "n_refseg": 5, "dice_org": 0.1}}  # overall is never compared
    for name, changes in (("ct", ct), ("xray", xray)):
        if changes is not None:
            out[name] = {**full, **changes}
    return out


def comparison(served, candidate):
    return {"served": {"score": selection.selection_score(served)}, "candidate": {"score": selection.selection_score(candidate)},
            "worse": selection.regressions(served, candidate, model_store.GATE_TOLERANCE)}


def test_selection_score_is_the_mean_per_modality_then_over_modalities():
    both = report(ct={"dice_abn": None}, xray={"detection_f1": 0.5, "diagnosis_f1": 0.5, "dice_org": 0.5,
                                               "dice_abn": 0.5, "refseg_dice": 0.5})
    ct_mean = (0.9 + 0.9 + 0.85 + 0.8) / 4  # a metric without samples is left out, not counted as 0
    assert selection.selection_score(both) == pytest.approx((ct_mean + 0.5) / 2)
    assert selection.selection_score({"overall": {"dice_org": 1.0}}) is None
    # the trainer's best/ checkpoint uses the same definition
    from raddiagseg.training import trainer

    assert trainer.selection is selection


def test_regressions_per_modality_and_metric_beyond_the_tolerance():
    served = report(ct={}, xray={})
    slightly = report(ct={"dice_abn": 0.735}, xray={})  # -0.015: within 0.02
    assert selection.regressions(served, slightly, 0.02) == []
    worse = report(ct={}, xray={"dice_abn": 0.554})
    assert selection.regressions(served, worse, 0.02) == [
        {"modality": "xray", "metric": "dice_abn", "served": 0.75, "candidate": 0.554, "delta": -0.196, "tolerance": 0.02}]
    assert selection.regressions(served, slightly, 0.02, tolerances={"ct": {"dice_abn": 0.01}})[0]["tolerance"] == 0.01
    lost = report(ct={"dice_abn": None}, xray={})  # no true-positive masks any more: counts as 0
    assert [w["metric"] for w in selection.regressions(served, lost, 0.02)] == ["dice_abn"]


def test_gate_never_publishes_on_training_rows_alone_and_refuses_any_worse_guard_set():
    good, better = report(ct={}, xray={}), report(ct={"dice_org": 0.95}, xray={})
    forgot = report(ct={"dice_org": 0.95}, xray={"dice_abn": 0.554})
    ok, reason = model_store.gate({"corrections": comparison(good, better)})
    assert not ok and "reference_manifest" in reason and "at least 5 images" in reason
    ok, reason = model_store.gate({"reference": comparison(good, forgot), "corrections": comparison(good, better)})
    assert not ok and "reference validation set" in reason and "X-ray dice_abn 0.750 -> 0.554" in reason
    ok, reason = model_store.gate({"reference": comparison(good, good), "heldout_corrections": comparison(good, forgot)})
    assert not ok and "held-out corrections" in reason
    ok, reason = model_store.gate({"reference": comparison(good, good), "corrections": comparison(better, good)})
    assert not ok and "not better on the corrections it trained on" in reason
    ok, reason = model_store.gate({"reference": comparison(good, report(ct={"dice_abn": 0.74}, xray={})),
                                   "corrections": comparison(good, better)})
    assert ok and "0.02" in reason


def records(n, flipped=(), dice_abn=0.75, modality="xray"):
    """Per-row records as `evaluate_model(..., return_records=True)` scores them: n positive VQA-Seg rows, detection
    right, diagnosis right except the `flipped` rows (c = 0, so their masks are not counted)."""
    out = []
    for i in range(n):
        c = 0 if i in flipped else 1
        out.append({"id": f"row{i}", "task": "vqaseg", "modality": modality, "gt_detection": True,
                    "detection_for_f1": True, "detection_readable": True, "detection_correct": True, "c": c,
                    "dice": [("lung", "organ", 0.95), ("infection", "abnormality", dice_abn)] if c else [],
                    "overlaps": [(90, 100, 100)]})
    return out


def build(rows):
    from raddiagseg.evaluation.scoring import build_report

    return build_report(rows)


def noise_gate(served_records, candidate_records):
    """The train task's comparison of two models on one guard set: noise-raised tolerances, then the gate."""
    old, new = build(served_records), build(candidate_records)
    noise = selection.paired_noise(served_records, candidate_records)
    tolerances = selection.noise_tolerances(noise, model_store.GATE_TOLERANCE, model_store.GATE_TOLERANCE_CAP,
                                            model_store.NOISE_Z)
    worse = selection.regressions(old, new, model_store.GATE_TOLERANCE, tolerances=tolerances)
    both = comparison(report(ct={}, xray={}), report(ct={}, xray={}))
    sets = {"reference": {**comparison(old, new), "worse": worse}, "corrections": both}
    return model_store.gate(sets), noise, tolerances


def test_gate_tolerance_is_the_measured_noise_and_forgetting_is_still_refused():
    served = records(24)
    # The same model (or one that changed nothing): no noise, the floor applies.
    (ok, _), noise, tolerances = noise_gate(served, records(24))
    assert ok and noise["xray"]["diagnosis_f1"] == 0.0 and tolerances["xray"]["diagnosis_f1"] == 0.02
    # One diagnosis flip among 24 X-ray rows moves diagnosis F1 by 0.021: a fixed 0.02 refuses it, the measured
    # noise of that comparison (~0.02) does not.
    one_flip = records(24, flipped={5})
    drop = build(served)["xray"]["diagnosis_f1"] - build(one_flip)["xray"]["diagnosis_f1"]
    assert 0.02 < drop < 0.025
    assert selection.regressions(build(served), build(one_flip), 0.02)
    (ok, reason), noise, tolerances = noise_gate(served, one_flip)
    assert 0.015 < noise["xray"]["diagnosis_f1"] < 0.03 and tolerances["xray"]["diagnosis_f1"] > drop
    assert ok and "measured noise" in reason
    # Forgetting: every abnormality mask worse by 0.2 is consistent across rows (no noise) and refused.
    (ok, reason), noise, _ = noise_gate(served, records(24, dice_abn=0.55))
    assert not ok and noise["xray"]["dice_abn"] < 0.001
    assert "X-ray dice_abn 0.750 -> 0.550 (tolerance 0.020)" in reason
    # Many flips are noisy too, but a drop beyond the cap is refused whatever the noise.
    (ok, reason), noise, tolerances = noise_gate(served, records(24, flipped=set(range(6))))
    assert model_store.NOISE_Z * noise["xray"]["diagnosis_f1"] > 0.05 and tolerances["xray"]["diagnosis_f1"] == 0.05
    assert not ok and "X-ray diagnosis_f1 1.000 -> 0.857 (tolerance 0.050)" in reason


def test_training_mix_draws_replay_rows_at_the_ratio_with_paths_that_resolve(tmp_path):
    from lib.trainers.raddiagseg import write_training_mix

    corrections, replay = tmp_path / "corr", tmp_path / "replay"
    for folder, n in ((corrections, 3), (replay, 20)):
        folder.mkdir()
        (folder / "images").mkdir()
        rows = []
        for i in range(n):
            (folder / "images" / f"{i}.png").write_bytes(b"x")
            rows.append({"id": f"r{i}", "task": "vqaseg", "split": "train", "image": f"images/{i}.png", "targets": []})
        rows.append({"id": "v", "task": "vqaseg", "split": "val", "image": "images/0.png", "targets": []})
        rows.append({"id": "q", "task": "vqa", "split": "train", "image": "images/0.png", "targets": []})
        (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = reference.ReferenceSet("replay", replay / "manifest.jsonl", "train", "test")
    manifest, n_corr, n_replay = write_training_mix(corrections / "manifest.jsonl", source, 2, tmp_path / "mix")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert (n_corr, n_replay) == (9, 20) and len(rows) == 29  # 3 corrections x 3 repeats: about 2 replay rows each
    assert sum(r["id"].startswith("replay/") for r in rows) == 20 and all(r["split"] == "train" for r in rows)
    assert len({r["id"] for r in rows}) == 29  # repeated rows keep distinct ids
    assert all((tmp_path / "mix" / r["image"]).is_file() for r in rows)  # absolute paths
    assert write_training_mix(corrections / "manifest.jsonl", source, 50, tmp_path / "m2")[1:] == (3, 20)  # small pool
    assert write_training_mix(corrections / "manifest.jsonl", None, 4, tmp_path / "m3")[1:] == (3, 0)
    assert write_training_mix(corrections / "manifest.jsonl", source, 0, tmp_path / "m4")[1:] == (3, 0)


def test_demo_model_records_its_reference_phantoms():
    spec = reference.read_reference(DEMO_MODEL)
    assert spec["replay"]["phantoms"]["seed"] == 1234 and spec["validation"]["phantoms"]["seed"] == 98765
    assert spec["replay"]["generator"].startswith("raddiagseg ") and len(spec["validation"]["sha256"]) == 64


def test_reference_manifest_resolves_and_a_missing_one_is_named(tmp_path):
    (tmp_path / "manifest.jsonl").write_text("")
    sets = reference.resolve(reference.manifest_reference(tmp_path), tmp_path / "cache")
    assert sets["replay"].split == "train" and sets["validation"].split == "val"
    with pytest.raises(FileNotFoundError, match="reference_manifest"):
        reference.resolve(reference.manifest_reference(tmp_path / "nowhere.jsonl"), tmp_path / "cache")


def test_slicer_retrain_panel_shows_both_models_on_both_sets():
    served, forgot = report(ct={}, xray={}), report(ct={"dice_org": 0.95}, xray={"dice_abn": 0.554})
    summary = lambda r: {"rows": 15, "score": selection.selection_score(r),  # noqa: E731
                         "metrics": selection.per_modality(r, selection.STAGE_METRICS["finetune"])}
    sets = {"reference": {"served": summary(served), "candidate": summary(forgot),
                          "worse": selection.regressions(served, forgot, 0.02)},
            "corrections": {"served": summary(served), "candidate": summary(forgot), "worse": []}}
    publish, reason = model_store.gate(sets)
    stats = {"published": publish, "reason": reason, "gate": {"tolerance": 0.02, "sets": sets},
             "reference": {"guarded": True}}
    lines = gate_report(stats)
    assert lines[0].startswith("Publishing check") and "0.02" in lines[0]
    assert lines[1].startswith("Reference validation set (15 rows): score")
    assert "X-ray:" in lines[3] and "Dice abnormality 0.750 → 0.554 (worse)" in lines[3]
    assert "Dice organ 0.850 → 0.950" in lines[2] and "(worse)" not in lines[2]
    assert lines[4].startswith("Corrections trained on (15 rows)")
    progress = training_progress({"status": "DONE"}, stats)
    assert progress.published is False and "old model stays live" in progress.message
    assert "Dice abnormality 0.750 → 0.554 (worse)" in progress.message
    ruled = gate_report({**stats, "gate": {**stats["gate"], "rule": model_store.TOLERANCE_RULE}})
    assert ruled[0] == f"Publishing check (served → new; {model_store.TOLERANCE_RULE}):" and "0.05" in ruled[0]
    unguarded = gate_report({"reference": {"guarded": False, "warning": "forgetting is unguarded"}})
    assert unguarded == ["Warning: forgetting is unguarded"]
