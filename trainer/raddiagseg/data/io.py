"""Reading and writing the 2D slices and masks of a built dataset, and orienting CT volumes.

Every part (dataset, scorer, app) reads manifest images through `read_slice` so that 2D NIfTI
(CT in HU) and 8-bit rasters (X-ray PNG, VQA images) come back as the same (H, W) arrays.
CT volumes are reoriented to LPS before slicing so that every axial slice is shown the
radiological way (row 0 anterior, column 0 = patient's right), whatever the file's direction
cosines: `axial_slice(lps_data, k)`.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LPS = ("L", "P", "S")


def is_nifti(path):
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_slice(path):
    """A 2D image or mask as an (H, W) array: NIfTI keeps its stored values (HU), rasters become 8-bit grey."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    if is_nifti(path):
        try:
            array = np.asarray(nib.load(str(path)).dataobj)
        except Exception as exc:  # nibabel raises several types for corrupt files
            raise ValueError(f"unreadable NIfTI {path}: {exc}") from exc
        array = np.squeeze(array)
        if array.ndim != 2:
            raise ValueError(f"{path} is not a 2D slice (shape {array.shape})")
        return array
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise ValueError(f"unreadable image {path}: {exc}") from exc


def write_nifti_slice(path, array, affine):
    """Save a 2D array (rows, cols) as NIfTI with the affine that places it in patient space."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def write_png(path, array):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def load_volume_lps(path, dtype=None):
    """Load a 3D NIfTI volume reoriented so that its array axes run to patient Left, Posterior, Superior.

    Returns (data, affine) where affine maps (i, j, k) of `data` to RAS+ millimetres (NIfTI world).
    """
    image = nib.load(str(path))
    if len(image.shape) < 3:
        raise ValueError(f"{path} is not a 3D volume (shape {image.shape})")
    current = nib.orientations.io_orientation(image.affine)
    target = nib.orientations.axcodes2ornt(LPS)
    transform = nib.orientations.ornt_transform(current, target)
    data = np.asarray(image.dataobj)
    if data.ndim > 3 and int(np.prod(data.shape[3:])) == 1:
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise ValueError(f"{path} is not a 3D volume (shape {data.shape})")
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    oriented = nib.orientations.apply_orientation(data, transform)
    affine = image.affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(oriented), affine


def axial_slice(lps_data, k):
    """Axial slice k of an LPS array as (rows = anterior→posterior, cols = patient right→left)."""
    return lps_data[:, :, k].T


def axial_slice_affine(lps_affine, k):
    """Affine of `axial_slice(data, k)` viewed as a 2D image (row, col) → RAS mm, so masks keep the slice geometry."""
    swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, k], [0, 0, 0, 1]], dtype=float)
    return lps_affine @ swap


# NIfTI affine of a 2D slice stored as the model sees it (rows to posterior, columns to patient left, unit spacing):
# what `axial_slice_affine` gives an LPS volume at the origin; `raddiagseg.imaging.model_view` reads it unchanged
VIEW_SLICE_AFFINE = axial_slice_affine(np.diag([-1.0, -1.0, 1.0, 1.0]), 0)
