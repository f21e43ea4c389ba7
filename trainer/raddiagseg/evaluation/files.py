"""Reading and writing the benchmark's files: 2D masks and slices (JSONL manifests and predictions: `data.records`).

Masks and slices are PNG (X-ray, predictions) or 2D NIfTI (CT, HU), read through the data
package's `read_slice` so that a mask written from the model's output for a slice lands on the
same pixels as the GT mask the dataset reads.
"""

from pathlib import Path

import numpy as np

from raddiagseg.data.records import InputFileError


class BenchmarkInputError(InputFileError):
    """Bad benchmark input (file missing, unreadable, wrong size): one line saying which file and what to fix."""


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
