"""Turn the server's training status into what the Retrain progress bar and label show.

MONAI Label reports the task (`GET /train/`: status RUNNING / DONE / ERROR / STOPPED, log
lines in `details`) and the trainer's own statistics (`train_stats` in `/info/`). The RadDiag
trainer reports steps, loss, the validation metric and whether the new model was published.
"""


class TrainingProgress:
    __slots__ = ("state", "fraction", "message", "published")

    def __init__(self, state, fraction, message, published=None):
        self.state = state          # idle | running | done | failed | stopped
        self.fraction = fraction    # 0..1 or None when unknown
        self.message = message
        self.published = published  # True: new model live; False: kept the old one; None: unknown

    @property
    def finished(self):
        return self.state in ("done", "failed", "stopped")

    def __repr__(self):
        return f"TrainingProgress({self.state!r}, {self.fraction!r}, {self.message!r})"


def _number(stats, *keys):
    for key in keys:
        value = stats.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None


def training_progress(task, stats):
    """Progress from a `GET /train/` task dict (or None) and the model's `train_stats` dict."""
    stats = stats or {}
    status = str((task or {}).get("status", "")).upper()
    step = _number(stats, "step", "global_step", "epoch")
    total = _number(stats, "total_steps", "max_steps", "total_epochs")
    fraction = min(1.0, step / total) if step is not None and total else None
    loss = _number(stats, "loss", "train_loss")
    metric = _number(stats, "val_metric", "best_metric")
    bits = []
    if step is not None:
        bits.append(f"step {int(step)}/{int(total)}" if total else f"step {int(step)}")
    if loss is not None:
        bits.append(f"loss {loss:.4f}")
    if metric is not None:
        bits.append(f"validation {metric:.3f}")
    detail = ", ".join(bits)
    published = stats.get("published", stats.get("model_published"))
    published = bool(published) if published is not None else None
    if not task:
        return TrainingProgress("idle", None, "No training has run on this server yet.")
    if status in ("RUNNING", "QUEUED", "PENDING"):
        return TrainingProgress("running", fraction, "Training… " + (detail or "starting"))
    if status == "DONE":
        if published is False:
            reason = stats.get("reason") or "its validation was not better than the served model's"
            return TrainingProgress("done", 1.0, f"Training finished; the old model stays live ({reason}). {detail}".strip(),
                                    published=False)
        return TrainingProgress("done", 1.0, f"Training finished: the new model is live. {detail}".strip(), published=True)
    if status in ("STOPPED", "CANCELLED"):
        return TrainingProgress("stopped", fraction, "Training was stopped; the previous model stays live.")
    last = str(stats.get("error") or "").strip()[-300:]
    details = (task or {}).get("details") or []
    if details and not last:
        last = str(details[-1]).strip()[-300:]
    return TrainingProgress("failed", fraction, f"Training failed ({status or 'unknown status'}); the previous model stays live. "
                                                + (f"Last server message: {last}" if last else "See the server log."))
