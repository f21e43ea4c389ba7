"""Train task `raddiagseg`: fine-tune the served model on the corrected labels, publish it only if not worse.

MONAI Label runs this in a separate process that re-creates the app, so everything it shares
with the server goes through files in the work dir: `train_stats.json` (progress, read by
`stats()` for `/info/`) and the published model (`models/CURRENT`, picked up by the infer task
on its next request). A failure leaves the served model untouched and exits non-zero (ERROR).
"""

import dataclasses
import json
import logging
import os
import time
import uuid
from pathlib import Path

from monailabel.interfaces.tasks.train import TrainTask

from lib import training_data

logger = logging.getLogger(__name__)

METRIC_KEYS = ("detection_acc", "diagnosis_acc", "dice_org", "dice_abn", "refseg_dice")
TASK_RATIO = {"vqaseg": 0.7, "refseg": 0.3}  # corrected answers, and masks by name
TRAIN_PARAMS = {"max_steps": (1, 20000, 60), "val_max_samples": (1, 10000, 200)}


def validation_score(report, other=None):
    """One number to compare two models on the same validation set: mean of the metrics either one has.

    A metric missing (None) for a model that the other one has counts as 0 for it (e.g. no
    true-positive masks to compute Dice on).
    """
    mine, theirs = report.get("overall", report), (other or {}).get("overall", other or {})
    keys = [k for k in METRIC_KEYS if mine.get(k) is not None or theirs.get(k) is not None]
    if not keys:
        return 0.0
    return sum(float(mine.get(k) or 0.0) for k in keys) / len(keys)


def write_json_atomic(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


class RadDiagSegTrain(TrainTask):
    def __init__(self, store, work_dir, description="Fine-tune RadDiagSeg on corrected labels (LoRA, projector, mask decoder)"):
        super().__init__(description)
        self.store = store
        self.work_dir = Path(work_dir)
        self.stats_path = self.work_dir / "train_stats.json"

    def config(self):
        return {k: default for k, (_, _, default) in TRAIN_PARAMS.items()}

    def stats(self):
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def _params(self, request):
        params = {}
        for key, (low, high, default) in TRAIN_PARAMS.items():
            value = request.get(key, default)
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be an integer between {low} and {high}") from None
            if not low <= value <= high:
                raise ValueError(f"{key} must be between {low} and {high}, got {value}")
            params[key] = value
        return params

    def __call__(self, request, datastore):
        stats = {"status": "RUNNING", "start_ts": time.strftime("%Y-%m-%d %H:%M:%S"), "published": False}
        write_json_atomic(self.stats_path, stats)
        try:
            result = self._train(request, datastore, stats)
            stats.update(result, status="DONE", end_ts=time.strftime("%Y-%m-%d %H:%M:%S"))
            write_json_atomic(self.stats_path, stats)
            return stats
        except Exception as error:
            stats.update(status="ERROR", error=f"{type(error).__name__}: {error}", end_ts=time.strftime("%Y-%m-%d %H:%M:%S"))
            write_json_atomic(self.stats_path, stats)
            raise

    def _train(self, request, datastore, stats):
        from raddiagseg.evaluation import evaluate_model
        from raddiagseg.training import TrainConfig, train

        params = self._params(request)
        run_dir = self.work_dir / "train" / time.strftime("run-%Y%m%dT%H%M%S")
        data = training_data.build(datastore, run_dir / "data")
        stats["data"] = data
        write_json_atomic(self.stats_path, stats)
        if data["train_samples"] == 0:
            raise ValueError("no usable corrected labels: save final labels with label info (segments, diagnosis) first")

        served = self.store.current_dir()
        baseline = evaluate_model(str(served), data["manifest"], split="val")

        started = time.time()

        def progress(update):
            stats.update({k: v for k, v in update.items() if v is not None})
            stats["epoch"], stats["total_epochs"] = update.get("step"), update.get("total_steps")
            stats["total_time"] = round(time.time() - started, 1)
            write_json_atomic(self.stats_path, stats)

        wanted = {"data": data["manifest"], "stage": "finetune", "preset": _preset(served), "init": str(served),
                  "out": str(run_dir / "run"), "max_steps": params["max_steps"], "ratio": dict(TASK_RATIO),
                  "warmup": 0.1, "val_every": params["max_steps"], "augment": False, "progress_bar": False}
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        result = train(TrainConfig(**{k: v for k, v in wanted.items() if k in known}), progress=progress)

        candidate = evaluate_model(str(result.best_checkpoint), data["manifest"], split="val")
        old, new = validation_score(baseline, candidate), validation_score(candidate, baseline)
        outcome = {
            "metric_name": "mean(" + ", ".join(METRIC_KEYS) + ") on the validation set",
            "baseline_metric": round(old, 4),
            "new_metric": round(new, 4),
            "best_metric": round(new, 4),
            "val_on_train": data["val_on_train"],
            "checkpoint": str(result.best_checkpoint),
        }
        if new >= old:
            outcome["published_model"] = str(self.store.publish(result.best_checkpoint))
            outcome["published"] = True
        else:
            outcome["published"] = False
            outcome["reason"] = f"validation metric {new:.4f} is worse than the served model's {old:.4f}; kept the served model"
        logger.info("Training finished: %s", outcome)
        return outcome


def _preset(model_dir):
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("preset", "demo")
    except (OSError, ValueError):
        return "demo"
