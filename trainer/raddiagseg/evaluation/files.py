"""Reading and writing the benchmark's files: JSONL manifests and prediction files, 2D masks and slices.

Masks and slices are PNG (X-ray, predictions) or 2D NIfTI (CT, HU). Arrays keep the layout the
file stores (NIfTI: array as stored, PNG: rows × columns) so a mask written from a model's output
for a slice read here lands on the same pixels.
"""

import json
from pathlib import Path

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")


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


def _is_nifti(path):
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_array(path):
    """A 2D array from a PNG or a 2D NIfTI file (trailing singleton dimensions dropped)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkInputError(f"{path} not found")
    try:
        if _is_nifti(path):
            import nibabel

            array = np.asanyarray(nibabel.load(str(path)).dataobj)
        else:
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image.convert("L") if image.mode not in ("L", "I", "I;16", "F", "1") else image)
    except BenchmarkInputError:
        raise
    except Exception as exc:  # a corrupt or foreign file: say which one
        raise BenchmarkInputError(f"cannot read {path}: {exc}") from None
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise BenchmarkInputError(f"{path} is not a 2D image (shape {array.shape})")
    return array


def read_mask(path):
    """A binary (bool) 2D mask: any value > 0 is foreground."""
    return read_array(path) > 0


def write_mask_png(path, mask):
    """Write a binary mask as an 8-bit PNG (0 / 255, easy to view); folders are created."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).save(path)
