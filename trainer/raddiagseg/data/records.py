"""Manifest rows: constructors for the three tasks, split assignment, the skip report, and manifest I/O.

Why: every converter must emit exactly the manifest contract of docs/INTERFACES.md; building
rows here keeps the questions and answers coming from `templates.py` only.
"""

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from raddiagseg import templates, vocabulary
from raddiagseg.fileio import atomic_write

log = logging.getLogger(__name__)

TASKS = ("vqaseg", "refseg", "vqa", "reasonseg")
SPLITS = ("train", "val", "test")
MODALITIES = ("ct", "xray", "mri")


@dataclass
class BuildReport:
    """What was skipped and why, so that one bad file never stops a build."""

    skipped: list = field(default_factory=list)  # (path, reason)

    def skip(self, path, reason):
        self.skipped.append((str(path), reason))
        log.warning("skipped %s: %s", path, reason)

    def summary(self, limit=20):
        if not self.skipped:
            return "nothing skipped"
        lines = [f"skipped {len(self.skipped)} item(s):"]
        lines += [f"  {path}: {reason}" for path, reason in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


def diagnosis_for(organ, abnormality):
    """The vocabulary diagnosis label for (organ, abnormality), or None."""
    for d in vocabulary.load()["diagnoses"]:
        if d["organ"] == organ and d["abnormality"] == abnormality:
            return d["label"]
    return None


def vqaseg_row(base, detection, diagnosis=None, targets=()):
    """A VQA-Seg row: positives name the targets in seg-token order; negatives have no targets."""
    targets = list(targets) if detection else []
    answer = templates.vqaseg_answer(detection, diagnosis, [t["name"] for t in targets])
    return {**base, "task": "vqaseg", "question": templates.DEFAULT_QUESTION, "answer": answer,
            "detection": bool(detection), "diagnosis": diagnosis if detection else None, "targets": targets}


def refseg_row(base, target):
    return {**base, "task": "refseg", "question": templates.refseg_question(target["name"], base["modality"]),
            "answer": templates.refseg_answer(target["name"]), "detection": None, "diagnosis": None,
            "targets": [target]}


def reasonseg_row(base, target, description, variant=0, subset=None):
    """A reasoning-segmentation row (paper 002): the question describes `target` without naming it."""
    return {**base, "task": "reasonseg", "question": templates.reasonseg_question(description, base["modality"], variant),
            "answer": templates.reasonseg_answer(description, target["name"]), "detection": None, "diagnosis": None,
            "targets": [target], "description": description, "subset": subset or base.get("source") or "all"}


def reasonseg_rows(rows, seed=0):
    """Reasoning-segmentation rows derived from the segmentation rows (refseg, positive vqaseg): one per
    (image, target) whose target has implicit descriptions in the vocabulary, same image, mask and split.
    The description and question wording are a pure function of (seed, row id, target)."""
    out, seen = [], set()
    for row in rows:
        if row["task"] not in ("refseg", "vqaseg") or (row["task"] == "vqaseg" and not row.get("detection")):
            continue
        for target in row.get("targets") or []:
            descriptions = vocabulary.implicit_descriptions(target["name"])
            key = (row["image"], target["name"])
            if not descriptions or not target.get("mask") or key in seen:
                continue
            seen.add(key)
            rng = random.Random(f"{seed}:reasonseg:{row['id']}:{target['name']}")
            base = {k: v for k, v in row.items() if k not in ("task", "question", "answer", "detection", "diagnosis", "targets", "answer_type")}
            base["id"] = f"{row['id']}__reason_{target['name'].replace(' ', '_')}"
            out.append(reasonseg_row(base, target, rng.choice(descriptions), rng.randrange(len(templates.REASONSEG_QUESTIONS))))
    return out


def vqa_row(base, question, answer, answer_type):
    if answer_type not in ("closed", "open"):
        raise ValueError(f"answer_type must be closed or open, got {answer_type!r}")
    return {**base, "task": "vqa", "question": question, "answer": answer, "detection": None, "diagnosis": None,
            "targets": [], "answer_type": answer_type}


def assign_splits(groups, seed, name, fractions=(0.7, 0.15, 0.15)):
    """Map each group id (a volume, an image) to train/val/test; a pure function of (ids, seed, name).

    With three or more groups, val and test each get at least one, so small phantom runs still
    have held-out volumes.
    """
    ids = sorted(set(groups))
    random.Random(f"{seed}:{name}").shuffle(ids)
    n = len(ids)
    n_test = round(n * fractions[2])
    n_val = round(n * fractions[1])
    if n >= 3:
        n_test = max(1, n_test) if fractions[2] > 0 else 0
        n_val = max(1, n_val) if fractions[1] > 0 else 0
    test, val = ids[:n_test], ids[n_test:n_test + n_val]
    return {g: ("test" if g in test else "val" if g in val else "train") for g in ids}


class InputFileError(ValueError):
    """A user's input file (manifest, predictions, mask) cannot be used: one line naming it and what to fix."""


def read_jsonl(path, what="file"):
    """[(line number, object)] of a JSONL file; blank lines skipped; a broken line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{what} {path} not found")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputFileError(f"{path} line {number} is not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise InputFileError(f"{path} line {number} is not a JSON object")
            rows.append((number, obj))
    return rows


def read_manifest(path, split=None, base=False):
    """Manifest rows (dicts), optionally only one split; `path` may be the dataset folder holding manifest.jsonl.

    Every row needs an `id` and a `task`. `base=True` adds `_base` to each row: the manifest's folder, which the
    image and mask paths are relative to (the scorer and predictor carry rows on their own)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.jsonl"
    rows = []
    for number, row in read_jsonl(path, "manifest"):
        missing = [key for key in ("id", "task") if key not in row]
        if missing:
            raise InputFileError(f"{path} line {number} has no {', '.join(missing)}")
        if split and row.get("split") != split:
            continue
        rows.append({**row, "_base": str(path.parent)} if base else row)
    return rows


def write_manifest(path, rows):
    """Write rows as JSONL atomically (a crash never leaves a half-written manifest)."""
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
