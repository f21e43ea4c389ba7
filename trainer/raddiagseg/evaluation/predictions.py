"""The prediction file (`PRED.jsonl`) that `predict` writes and `score` reads.

One JSON object per line:

* standard: `{"id": ..., "answer": "1. Yes\\n2. ...", "masks": {"<seg000>": "masks/ID_seg000.png", ...}}`
* amputated (`--amputated`, for models that cannot follow the 3-step format): the three
  questions of `AMPUTATED_QUESTIONS` asked separately,
  `{"id": ..., "answers": {"detection": ..., "diagnosis": ..., "segmentation": ...}, "masks": {...}}`
  where the masks belong to the seg tokens of the `segmentation` answer. Ref-Seg and VQA rows
  keep the standard `answer`.

Mask paths are relative to the prediction file's folder. The writer appends and flushes one
line per sample after its masks are on disk, so a killed run resumes where it stopped.
"""

import json
import logging
import os
import re
from pathlib import Path

from raddiagseg.data.records import read_jsonl
from raddiagseg.evaluation.files import BenchmarkInputError, write_mask_png

log = logging.getLogger(__name__)

AMPUTATED_QUESTIONS = {
    "detection": "Is there any abnormality present in this image? Answer yes or no.",
    "diagnosis": "What is the diagnosis?",
    "segmentation": "What is the diagnosis? Provide segmentation masks of the organ and abnormality.",
}


def read_predictions(path, manifest_ids=None):
    """id -> record. A later line for the same id replaces an earlier one; ids outside `manifest_ids` are an error."""
    predictions = {}
    for number, record in read_jsonl(path, "prediction file"):
        if "id" not in record:
            raise BenchmarkInputError(f"{path} line {number} has no 'id'")
        if record["id"] in predictions:
            log.warning("%s line %d repeats id %r: the later line is used", path, number, record["id"])
        predictions[record["id"]] = record
    if manifest_ids is not None:
        unknown = [i for i in predictions if i not in manifest_ids]
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:3])
            raise BenchmarkInputError(
                f"{len(unknown)} prediction id(s) are not in the manifest (split) given, e.g. {shown}: "
                "score against the manifest the predictions were made for"
            )
    return predictions


def safe_name(sample_id):
    """A file-name-safe version of a sample id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(sample_id)).strip("._") or "sample"


class PredictionWriter:
    """Appends prediction lines to PRED.jsonl, writing each sample's masks as PNG under `masks/` first.

    Opening an existing file keeps its complete lines (their ids are in `done`) and drops a last
    line cut short by a crash, so the run can resume.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.mask_dir = self.path.parent / "masks"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.amputated_ids = set()  # ids whose existing line is in the amputated format
        self.done = self._recover()
        self._handle = self.path.open("a", encoding="utf-8")

    def _recover(self):
        if not self.path.exists():
            return set()
        data = self.path.read_bytes()
        done, keep = set(), 0
        for line in data.splitlines(keepends=True):
            try:
                record = json.loads(line)
                complete = line.endswith(b"\n") and isinstance(record, dict) and "id" in record
            except ValueError:
                complete = False
            if not complete:
                if keep + len(line) < len(data):
                    raise BenchmarkInputError(
                        f"{self.path} has a broken line in the middle: fix or delete it before resuming"
                    )
                log.warning("%s: dropping an incomplete last line left by an interrupted run", self.path)
                break
            done.add(record["id"])
            if "answers" in record:
                self.amputated_ids.add(record["id"])
            keep += len(line)
        if keep < len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(keep)
        return done

    def write(self, sample_id, segments=None, answer=None, answers=None):
        """Write one sample. `segments`: [(token, bool mask)] to save; `answer` or `answers` (amputated)."""
        masks = {}
        for token, mask in segments or []:
            name = f"{safe_name(sample_id)}_{token.strip('<>')}.png"
            write_mask_png(self.mask_dir / name, mask)
            masks[token] = f"masks/{name}"
        record = {"id": sample_id}
        if answers is not None:
            record["answers"] = answers
        else:
            record["answer"] = answer
        record["masks"] = masks
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.done.add(sample_id)

    def close(self):
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
