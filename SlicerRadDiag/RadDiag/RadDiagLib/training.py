"""Turn the server's training status into what the Retrain progress bar and label show.

MONAI Label reports the task (`GET /train/`: status RUNNING / DONE / ERROR / STOPPED, log
lines in `details`) and the trainer's own statistics (`train_stats` in `/info/`). The RadDiag
trainer reports steps, loss, the validation metric and whether the new model was published, with its
publishing check (`gate`: both models' scores per modality on the reference validation set and on the
corrections) that `gate_report` writes out for the Retrain panel.
"""

MODALITY_TITLES = {"ct": "CT", "xray": "X-ray"}
METRIC_TITLES = {"detection_f1": "detection F1", "diagnosis_f1": "diagnosis F1", "dice_org": "Dice organ",
                 "dice_abn": "Dice abnormality", "refseg_dice": "Ref-Seg Dice"}
SET_TITLES = {"reference": "Reference validation set", "heldout_corrections": "Held-out corrections",
              "corrections": "Corrections trained on"}


def _value(value):
    return "–" if value is None else f"{value:.3f}"


def _worse_mark(worse):
    """' (worse)' for a metric the gate refused, with how far it could have dropped when the gate bounded it."""
    if not worse:
        return ""
    if "upper_drop" not in worse:
        return " (worse)"
    if worse.get("rows") is not None and worse.get("drop") is not None:  # servers that say what they compared
        return f" (worse: drop {worse['drop']:.3f} on the {worse['rows']} rows compared, up to {worse['upper_drop']:.3f})"
    return f" (worse: drop up to {worse['upper_drop']:.3f})"


def gate_report(stats):
    """Lines saying how the retrained model compared with the served one, set by set and metric by metric
    (served → new, marked where the new one is worse than the tolerance allows); [] when the stats carry no
    publishing check (the decision and its reason are in `stats["reason"]`)."""
    gate = (stats or {}).get("gate") or {}
    sets = gate.get("sets") or {}
    lines = []
    reference = (stats or {}).get("reference") or {}
    if reference.get("warning"):
        lines.append("Warning: " + reference["warning"])
    if not sets:
        return lines
    rule = gate.get("rule") or f"a metric may drop by at most {gate.get('tolerance')}"
    lines.append(f"Publishing check (served → new; {rule}):")
    attempts = gate.get("attempts") or []
    if len(attempts) > 1:  # the fine-tuned model was refused and blends that keep more of the served one were checked
        lines.append("Candidates checked: " + "; ".join(
            f"{'fine-tuned model' if a.get('weight') == 1 else 'blend weight ' + format(a.get('weight'), 'g')} "
            f"{'published' if a.get('published') else 'refused'}" for a in attempts) + " (shown: the last)")
    for name, entry in sets.items():
        served, candidate = entry.get("served") or {}, entry.get("candidate") or {}
        lines.append(f"{SET_TITLES.get(name, name)} ({served.get('rows', '?')} rows): score "
                     f"{_value(served.get('score'))} → {_value(candidate.get('score'))}")
        worse = {(w.get("modality"), w.get("metric")): w for w in entry.get("worse") or []}
        for modality, metrics in (served.get("metrics") or {}).items():
            new = (candidate.get("metrics") or {}).get(modality) or {}
            cells = [f"{METRIC_TITLES.get(k, k)} {_value(v)} → {_value(new.get(k))}" + _worse_mark(worse.get((modality, k)))
                     for k, v in metrics.items() if v is not None or new.get(k) is not None]
            lines.append(f"  {MODALITY_TITLES.get(modality, modality)}: " + ", ".join(cells))
    return lines



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
        phase = f" ({stats['phase']})" if stats.get("phase") else ""  # e.g. checking a blend after training
        return TrainingProgress("running", fraction, "Training… " + (detail or "starting") + phase)
    if status == "DONE":
        report = "\n".join(["", *gate_report(stats)]) if stats.get("gate") or stats.get("reference") else ""
        if published is False:
            reason = stats.get("reason") or "its validation was not better than the served model's"
            return TrainingProgress("done", 1.0, f"Training finished; the old model stays live ({reason}). {detail}".strip()
                                    + report, published=False)
        why = f" ({stats['reason']})" if stats.get("reason") else ""
        return TrainingProgress("done", 1.0, f"Training finished: the new model is live{why}. {detail}".strip() + report,
                                published=True)
    if status in ("STOPPED", "CANCELLED"):
        return TrainingProgress("stopped", fraction, "Training was stopped; the previous model stays live.")
    last = str(stats.get("error") or "").strip()[-300:]
    details = (task or {}).get("details") or []
    if details and not last:
        last = str(details[-1]).strip()[-300:]
    return TrainingProgress("failed", fraction, f"Training failed ({status or 'unknown status'}); the previous model stays live. "
                                                + (f"Last server message: {last}" if last else "See the server log."))
