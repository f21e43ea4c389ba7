"""Reading and writing the benchmark's files: JSONL manifests and prediction files, 2D masks and slices.

Masks and slices are PNG (X-ray, predictions) or 2D NIfTI (CT, HU), read through the data
package's `read_slice` so that a mask written from the model's output for a slice lands on the
same pixels as the GT mask the dataset reads.
"""

import json
from pathlib import Path

import numpy as np


class BenchmarkInputError(ValueError):
    """Bad benchmark input (file missing, unreadable, wrong size): one line saying which file and what to fix."""


def read_jsonl(path, what="file"):
    """[(line number, object)] of a JSONL file; blank lines skipped; a broken line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkInputError(f"{what} {path} not found")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkInputError(f"{path} line {number} is not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise BenchmarkInputError(f"{path} line {number} is not a JSON object")
            rows.append((number, obj))
    return rows


def read_manifest(path, split=None):
    """Manifest rows (dicts), optionally only one split. Each row gets `_base` = the manifest's folder.

    `path` may also be the dataset folder holding `manifest.jsonl`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.jsonl"
    rows = []
    for number, row in read_jsonl(path, "manifest"):
        missing = [key for key in ("id", "task") if key not in row]
        if missing:
            raise BenchmarkInputError(f"{path} line {number} has no {', '.join(missing)}")
        if split and row.get("split") != split:
            continue
        rows.append({**row, "_base": str(path.parent)})
    return rows


def read_array(path):
    """A 2D array from a PNG or a 2D NIfTI file, read the way the dataset and the app read it (in the model's
    view, `imaging.read_slice_view`), so a GT mask lies on the image the model saw."""
    from raddiagseg.imaging import read_slice_view

    try:
        return read_slice_view(path).slices[0]
    except FileNotFoundError:
        raise BenchmarkInputError(f"{path} not found") from None
    except ValueError as exc:
        raise BenchmarkInputError(str(exc)) from None


def read_mask(path):
    """A binary (bool) 2D mask: any value > 0 is foreground."""
    return read_array(path) > 0


def write_mask_png(path, mask):
    """Write a binary mask as an 8-bit PNG (0 / 255, easy to view); folders are created."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).save(path)
