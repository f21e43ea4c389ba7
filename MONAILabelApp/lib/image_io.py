"""Reading the images clients ask about, and writing label files in exactly their geometry.

Everything goes through SimpleITK so that size, spacing, origin and direction of a label
file are copied from the input image, never recomputed (a one-slice file keeps its single slice).
Reading and the model's view of an image (`model_view`, `VolumeView`: axial radiological slices,
and a `slice` index that always means "index k along the file's through-plane axis") live in
`raddiagseg.imaging`, shared with the trainer; this module adds the app's limits and label files.
"""

import numpy as np
import SimpleITK as sitk
from raddiagseg import imaging
from raddiagseg.imaging import (  # noqa: F401 - the app reads images through these names
    MODALITY_TAG, InputError, VolumeView, image_array, infer_modality, model_view,
)

from lib.infer_params import MAX_VOXELS
from lib.infer_params import RESULT_EXTENSIONS as LABEL_EXTENSIONS


def read_image(path):
    """`raddiagseg.imaging.read_image` with the app's size limit: what the model sees comes from the same reader
    in the app and in `raddiagseg predict`."""
    return imaging.read_image(path, max_voxels=MAX_VOXELS)


def label_extension(requested, is_volume):
    ext = requested or ".nii.gz"
    if ext not in LABEL_EXTENSIONS:
        raise InputError(f"result_extension must be one of {', '.join(LABEL_EXTENSIONS)}, got {ext!r}")
    if ext == ".png" and is_volume:
        raise InputError("result_extension .png only works for 2D images; use .nii.gz or .seg.nrrd for volumes")
    return ext


def write_label_map(path, labels, reference):
    """Write a label map (values 0..N, file index order) with the reference image's exact geometry."""
    labels = np.ascontiguousarray(labels.astype(np.uint8))
    if str(path).endswith(".png"):  # a 2D or one-slice image's plane, without geometry
        sitk.WriteImage(sitk.GetImageFromArray(labels.reshape(labels.shape[-2:])), str(path))
        return path
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def ijk_to_lps(reference):
    """4x4 voxel → LPS matrix of a 2D or 3D SimpleITK image (2D images become one-slice volumes)."""
    dim = reference.GetDimension()
    direction = np.eye(3)
    direction[:dim, :dim] = np.array(reference.GetDirection(), dtype=float).reshape(dim, dim)
    spacing = np.ones(3)
    spacing[:dim] = reference.GetSpacing()
    origin = np.zeros(3)
    origin[:dim] = reference.GetOrigin()
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix
