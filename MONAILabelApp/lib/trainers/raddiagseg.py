"""Train task `raddiagseg`: fine-tune the served model on the corrected labels mixed with replay of its training
distribution, and publish it only if it is not worse than the served model.

The served model's reference (`reference.json` in its folder, or `--conf reference_manifest`; see
`raddiagseg.training.reference`) gives replay rows, mixed into the corrections at `replay_ratio` replay rows per
correction row, and a fixed validation set. Candidate and served model are scored on that set, on the held-out
corrections (every 5th image once there are 5) and, with fewer images, on the corrections trained on; the
publishing gate (`model_store.gate`) compares them per modality and metric on the upper confidence bound of each
drop (`raddiagseg.training.selection`). A fine-tuned model the gate refuses for forgetting is followed by blends of
served and fine-tuned weights that keep more of the served model (`blend_tries`); the first that passes is published.

MONAI Label runs this in a separate process that re-creates the app, so everything it shares with the server goes
through files in the work dir: `train_stats.json` (progress and the gate report, read by `stats()` for `/info/`)
and the published model (`models/CURRENT`, picked up by the infer task on its next request). A failure leaves the
served model untouched and exits non-zero (ERROR).
"""

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

from monailabel.interfaces.tasks.train import TrainTask
from raddiagseg.fileio import atomic_write

from lib import model_store, train_guard, training_data

logger = logging.getLogger(__name__)

TASK_RATIO = {"vqaseg": 0.7, "refseg": 0.3}  # corrected answers, and masks by name
# name: (type, low, high, default). replay_ratio 4 and lr 2e-4: benchmarks/RESULTS.md, "Retraining with replay".
TRAIN_PARAMS = {
    "max_steps": (int, 1, 20000, 60),
    "val_max_samples": (int, 1, 10000, 1000),  # the demo reference set has 595 rows: all of it
    "replay_ratio": (float, 0.0, 50.0, 4.0),
    "lr": (float, 1e-6, 1e-2, 2e-4),
    "blend_tries": (int, 1, 8, 6),  # down to 1/32: RESULTS.md, "Retraining that cannot publish a worse model"
}
# MONAI Label's own name for the length of a run (its sample apps and integration tests send it): passes over the
# training mix (corrections + replay). Used when `max_steps` is not given.
MAX_EPOCHS = (float, 0.01, 1000.0)
UNGUARDED = ("no reference set for this model (no reference.json in its folder, no --conf reference_manifest): "
             "forgetting is unguarded; retraining uses the corrections alone and is checked on held-out corrections only")


def blend_weights(tries):
    """Weights of the fine-tuned model in the candidates the gate checks, in order: 1 (the fine-tuned model), then
    blends with the served model's weights that keep more of it (1/2, 1/4, ...; `checkpoints.blend`)."""
    return [0.5 ** k for k in range(tries)]


def write_json_atomic(path, data):
    atomic_write(path, json.dumps(data, indent=1, default=str))


def _rows(manifest, split=None):
    from raddiagseg.data.records import read_manifest

    return [r for r in read_manifest(manifest, split, base=True) if r["task"] in TASK_RATIO]


def _absolute(row):
    """A manifest row whose image and mask paths no longer depend on the manifest's folder."""
    base = Path(row.pop("_base"))
    targets = [{**t, "mask": str(base / t["mask"])} if t.get("mask") else t for t in row.get("targets") or []]
    return {**row, "image": str(base / row["image"]), "targets": targets}


def write_training_mix(corrections_manifest, replay, ratio, out):
    """out/manifest.jsonl: the corrections' train rows and the rows of `replay` (a ReferenceSet or None) so that a
    batch holds about `ratio` replay rows per correction row. The whole replay pool goes in (variety: few corrections
    must not mean a few replay rows learnt by heart) and the corrections are repeated to reach the ratio; a pool
    smaller than `ratio` x the corrections goes in whole. Returns (manifest path, correction rows, replay rows),
    counting repeated rows."""
    corrections = [_absolute(r) for r in _rows(corrections_manifest, "train")]
    pool = _rows(replay.manifest, replay.split) if replay is not None and ratio > 0 else []
    repeats = max(1, round(len(pool) / (ratio * len(corrections)))) if pool and corrections else 1
    mixed = [{**row, "id": f"{row['id']}#{k}" if k else row["id"]} for k in range(repeats) for row in corrections]
    mixed += [{**_absolute(r), "id": "replay/" + r["id"], "split": "train"} for r in pool]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.jsonl", "w") as handle:
        for row in mixed:
            handle.write(json.dumps(row) + "\n")
    return out / "manifest.jsonl", len(corrections) * repeats, len(pool)


def _summary(report):
    from raddiagseg.training import selection

    overall = report.get("overall", {})
    return {"rows": int(overall.get("n") or 0) + int(overall.get("n_refseg") or 0),
            "score": _round(selection.selection_score(report)),
            "metrics": {m: {k: _round(v) for k, v in values.items()}
                        for m, values in selection.per_modality(report, selection.STAGE_METRICS["finetune"]).items()}}


def _evaluate(model, gate_set, max_samples):
    """(report, per-row records) of a model (folder or loaded) on one gate set (manifest, split)."""
    from raddiagseg.evaluation import evaluate_model

    return evaluate_model(model, gate_set[0], split=gate_set[1], max_samples=max_samples, tasks=tuple(TASK_RATIO),
                          return_records=True)


def _round(value):
    return None if value is None else round(float(value), 4)


class RadDiagSegTrain(TrainTask):
    def __init__(self, store, work_dir, reference_manifest=None,
                 description="Fine-tune RadDiagSeg on corrected labels with replay; publish only if not worse"):
        super().__init__(description)
        self.store = store
        self.work_dir = Path(work_dir)
        self.stats_path = self.work_dir / "train_stats.json"
        self.reference_manifest = reference_manifest
        self.reference_cache = self.work_dir / "reference"

    def config(self):
        return {k: default for k, (_, _, _, default) in TRAIN_PARAMS.items()}

    def stats(self):
        try:
            stats = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}
        if stats.get("status") == "RUNNING" and not train_guard.is_running(self.work_dir):
            stats = self._interrupted(stats, "the training process ended without finishing (killed?)")
        return stats

    def _interrupted(self, stats, why):
        """Record that a run stopped without reaching DONE or ERROR (nothing was published by it after this)."""
        stats = {**stats, "status": "INTERRUPTED", "error": why, "end_ts": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json_atomic(self.stats_path, stats)
        return stats

    def _params(self, request):
        params = {}
        for key, (kind, low, high, default) in TRAIN_PARAMS.items():
            value = request.get(key, default)
            try:
                if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a{'n integer' if kind is int else ' number'} between {low} and {high}") from None
            if not low <= value <= high:
                raise ValueError(f"{key} must be between {low} and {high}, got {value}")
            params[key] = value
        if "max_epochs" in request and "max_steps" not in request:
            kind, low, high = MAX_EPOCHS
            value = request["max_epochs"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"max_epochs must be a number between {low} and {high}, got {value!r}")
            params["max_epochs"], params["max_steps"] = float(value), None
        return params

    def __call__(self, request, datastore):
        with train_guard.single_run(self.work_dir):  # refused before it touches the running one's stats
            stats = {"status": "RUNNING", "start_ts": time.strftime("%Y-%m-%d %H:%M:%S"), "published": False,
                     "pid": os.getpid()}
            write_json_atomic(self.stats_path, stats)
            train_guard.exit_with_parent(lambda: self._interrupted(stats, "the server that started it stopped"))
            try:
                result = self._train(request, datastore, stats)
                stats.update(result, status="DONE", end_ts=time.strftime("%Y-%m-%d %H:%M:%S"))
                write_json_atomic(self.stats_path, stats)
                return stats
            except Exception as error:
                stats.update(status="ERROR", error=f"{type(error).__name__}: {error}",
                             end_ts=time.strftime("%Y-%m-%d %H:%M:%S"))
                write_json_atomic(self.stats_path, stats)
                raise

    def reference_sets(self, model_dir, replay=True):
        """({replay, validation} ReferenceSets (validation only without `replay`) or None, and the train_stats
        entry saying where they come from)."""
        from raddiagseg.training import reference

        if self.reference_manifest:
            spec = reference.manifest_reference(self.reference_manifest)
        else:
            spec = reference.read_reference(model_dir)
        if spec is None:
            return None, {"guarded": False, "warning": UNGUARDED}
        sets = reference.resolve(spec, self.reference_cache, reference.PARTS if replay else ("validation",))
        entry = {"guarded": True, **{part: s.source for part, s in sets.items()}}
        warnings = [s.warning for s in sets.values() if s.warning]
        if warnings:
            entry["warning"] = "; ".join(warnings)
        return sets, entry

    def _served_report(self, served, gate_set, max_samples):
        """The served model's (report, per-row records) on a fixed set, kept per (model version, set, size) across
        runs."""
        cache_path = self.reference_cache / "served_reports.json"
        key = f"records|{self.store.version(served)}|{os.path.realpath(gate_set[0])}|{gate_set[1]}|{max_samples}"
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        if key not in cache:
            cache[key] = _evaluate(served, gate_set, max_samples)
            write_json_atomic(cache_path, cache)
        return tuple(cache[key])

    def _train(self, request, datastore, stats):
        from raddiagseg.training import TrainConfig, selection, train

        params = self._params(request)
        run_dir = self.work_dir / "train" / time.strftime("run-%Y%m%dT%H%M%S")
        data = training_data.build(datastore, run_dir / "data")
        stats["data"] = data
        write_json_atomic(self.stats_path, stats)
        if data["train_samples"] == 0:
            raise ValueError("no usable corrected labels: save final labels with label info (segments, diagnosis) first")

        served = self.store.current_dir()
        references, stats["reference"] = self.reference_sets(served, replay=params["replay_ratio"] > 0)
        manifest, n_corrections, n_replay = write_training_mix(
            data["manifest"], (references or {}).get("replay"), params["replay_ratio"], run_dir / "mix")
        data.update(correction_rows=n_corrections, replay_rows=n_replay)
        # The sets both models are scored on: (manifest, split). Corrections trained on only without held-out ones.
        gate_sets = {}
        if references:
            gate_sets["reference"] = (str(references["validation"].manifest), references["validation"].split)
        if data["val_on_train"]:
            gate_sets["corrections"] = (data["manifest"], "train")
        else:
            gate_sets["heldout_corrections"] = (data["manifest"], "val")
        stats["gate"] = self._gate_settings(params["blend_tries"])
        write_json_atomic(self.stats_path, stats)

        n = params["val_max_samples"]
        served_reports = {name: self._served_report(served, s, n) if name == "reference" else _evaluate(str(served), s, n)
                          for name, s in gate_sets.items()}
        candidate_reports = {}

        def evaluate(model):
            for name, gate_set in gate_sets.items():
                candidate_reports[name] = _evaluate(model, gate_set, n)
            return selection.selection_score(next(iter(candidate_reports.values()))[0])

        evaluate.metric_name = f"{selection.metric_name('finetune')} on {model_store.SET_TITLES[next(iter(gate_sets))]}"
        started = time.time()

        def progress(update):
            stats.update({k: v for k, v in update.items() if v is not None and k != "sample_indices"})
            stats["epoch"], stats["total_epochs"] = update.get("step"), update.get("total_steps")
            stats["total_time"] = round(time.time() - started, 1)
            write_json_atomic(self.stats_path, stats)

        wanted = {"data": str(manifest), "stage": "finetune", "preset": model_store.folder_preset(served) or "demo",
                  "init": str(served), "out": str(run_dir / "run"), "max_steps": params["max_steps"],
                  "epochs": params.get("max_epochs"), "lr": params["lr"], "ratio": dict(TASK_RATIO), "warmup": 0.1,
                  "val_every": params["max_steps"],
                  "augment": False, "progress_bar": False}
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        result = train(TrainConfig(**{k: v for k, v in wanted.items() if k in known}), progress=progress, evaluate=evaluate)
        return self._choose(served, result.best_checkpoint, run_dir, gate_sets, served_reports, candidate_reports,
                            params, stats, evaluate.metric_name,
                            domain_stats=lambda checkpoint: self._domain_stats(served, checkpoint, references, data))

    def _domain_stats(self, served, checkpoint, references, data):
        """The domain guard's statistics for the candidate (`raddiagseg.domain.finetuned_stats`, on the model loaded
        as the server will serve it: device and precision), written into its folder before it is published; a
        summary for train_stats (None when the served model has none)."""
        from raddiagseg import domain

        if references and "replay" not in references:  # trained without replay: the replay part is still its data
            references, _ = self.reference_sets(served)
        n = data.get("images", 0)
        corrections = f"{n} corrected image{'s' if n != 1 else ''} saved on a RadDiag server"
        model = model_store.load_for_serving(checkpoint, self.store.device, self.store.dtype)  # as it will be served
        return domain.finetuned_stats(model, checkpoint, served, corrections,
                                      [(str(ref.manifest), ref.split) for ref in (references or {}).values()])

    @staticmethod
    def _gate_settings(tries):
        from raddiagseg.training import selection

        return {"tolerance": model_store.GATE_TOLERANCE, "confidence": model_store.GATE_CONFIDENCE,
                "rule": model_store.TOLERANCE_RULE, "metrics": list(selection.STAGE_METRICS["finetune"]),
                "blend_weights": blend_weights(tries)}

    @staticmethod
    def _compare(served_reports, candidate_reports):
        """{set name: both models' summaries, the drop bounds and the metrics that may be worse than the tolerance}."""
        from raddiagseg.training import selection

        sets = {}
        for name, (old, old_records) in served_reports.items():
            new, new_records = candidate_reports[name]
            bounds = selection.drop_bounds(old_records, new_records, confidence=model_store.GATE_CONFIDENCE)
            sets[name] = {"served": _summary(old), "candidate": _summary(new), "bounds": bounds,
                          "worse": selection.regressions(old, new, model_store.GATE_TOLERANCE, bounds=bounds)}
        return sets

    def _choose(self, served, tuned, run_dir, gate_sets, served_reports, tuned_reports, params, stats, metric_name,
                domain_stats=None):
        """Gate the fine-tuned model, then, while it is refused for being worse on a guard set, blends of served and
        fine-tuned weights that keep more of the served model (weight 1/2, 1/4, ...: `blend_weights`); publish the
        first that passes. A blend is not tried after a refusal for not being better on the corrections (a smaller
        step learns them less)."""
        from raddiagseg.training import checkpoints

        attempts = []
        for weight in blend_weights(params["blend_tries"]):
            if weight == 1.0:
                folder, reports = Path(tuned), tuned_reports
            else:
                stats["phase"] = f"checking a blend with weight {weight:g} of the fine-tuned model"
                write_json_atomic(self.stats_path, stats)
                folder = checkpoints.blend(served, tuned, weight, Path(run_dir) / f"blend-{weight:g}")
                reports = {name: _evaluate(str(folder), s, params["val_max_samples"]) for name, s in gate_sets.items()}
            sets = self._compare(served_reports, reports)
            publish, reason = model_store.gate(sets)
            attempts.append({"weight": weight, "checkpoint": str(folder), "published": publish, "reason": reason,
                             "sets": sets})
            logger.info("blend weight %g: %s (%s)", weight, "publish" if publish else "refused", reason)
            if publish or not any(sets[n]["worse"] for n in model_store.GUARD_SETS if n in sets):
                break
        stats.pop("phase", None)
        return self._decide(served, attempts, metric_name, params["blend_tries"], domain_stats)

    def _decide(self, served, attempts, metric_name, tries, domain_stats=None):
        """The outcome of the last attempt (the published one, or the smallest step tried), every attempt's decision,
        and the model published when one passed; a published model first gets its domain statistics
        (`domain_stats(checkpoint)`, reported under `domain`)."""
        from raddiagseg.training import reference

        chosen = attempts[-1]
        publish, reason, sets = chosen["published"], chosen["reason"], chosen["sets"]
        if len(attempts) > 1:
            reason = f"blend weight {chosen['weight']:g} of the fine-tuned model: {reason}"
        first = next(iter(sets.values()))
        outcome = {"metric_name": metric_name, "baseline_metric": first["served"]["score"],
                   "new_metric": first["candidate"]["score"], "best_metric": first["candidate"]["score"],
                   "checkpoint": chosen["checkpoint"], "blend_weight": chosen["weight"], "published": publish,
                   "reason": reason}
        outcome["gate"] = {**self._gate_settings(tries), "sets": sets,
                           "published": publish, "reason": reason,
                           "attempts": [{k: a[k] for k in ("weight", "published", "reason", "checkpoint")}
                                        | {"scores": {n: [e["served"]["score"], e["candidate"]["score"]]
                                                      for n, e in a["sets"].items()}} for a in attempts]}
        if publish:
            if (Path(served) / reference.REFERENCE_FILE).is_file():  # the next retraining replays the same distribution
                shutil.copyfile(Path(served) / reference.REFERENCE_FILE, Path(chosen["checkpoint"]) / reference.REFERENCE_FILE)
            if domain_stats is not None:  # the published model keeps a domain guard fitted to it
                outcome["domain"] = domain_stats(chosen["checkpoint"])
            outcome["published_model"] = str(self.store.publish(chosen["checkpoint"]))
        logger.info("Training finished: published=%s (%s)", publish, reason)
        return outcome
