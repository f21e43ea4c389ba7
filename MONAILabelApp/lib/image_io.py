"""Reading the images clients ask about, and writing label files in exactly their geometry.

Everything goes through SimpleITK so that size, spacing, origin and direction of a label
file are copied from the input image, never recomputed. Volumes are shown to the model as
axial slices in the radiological view (rows anterior→posterior, columns patient right→left,
i.e. an LPS-ordered array `[S, P, L]`); `VolumeView` maps between that view and the file's
own index space so a `slice` index always means "index k along the file's through-plane axis".
"""

import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from lib.infer_params import MAX_VOXELS, InputError
from lib.infer_params import RESULT_EXTENSIONS as LABEL_EXTENSIONS

MODALITY_TAG = "0008|0060"  # DICOM Modality
DICOM_XRAY = {"CR", "DX", "DR", "RG", "RF", "XA", "PX"}  # projection radiography


def read_image(path):
    """Read a 2D/3D scalar image (NIfTI, NRRD, PNG/JPEG, DICOM file or DICOM series folder) with its geometry."""
    path = str(path)
    try:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(path)
            if not series:
                raise InputError(f"folder {os.path.basename(path)!r} holds no DICOM series")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(path, series[0]))
            image = reader.Execute()
        elif path.lower().endswith(".nii.gz"):
            image = _read_gzipped_nifti(path)
        else:
            image = sitk.ReadImage(path)
    except InputError:
        raise
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise InputError(f"cannot read the image as NIfTI/NRRD/PNG/JPEG/DICOM ({first[:200]})") from None
    dicom_modality = image.GetMetaData(MODALITY_TAG).strip().upper() if image.HasMetaDataKey(MODALITY_TAG) else ""
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = _to_gray(image)
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        image = image[:, :, 0]
    if dicom_modality:  # kept through the conversions above, for infer_modality
        image.SetMetaData(MODALITY_TAG, dicom_modality)
    if image.GetDimension() not in (2, 3):
        raise InputError(f"expected a 2D image or a 3D volume, got a {image.GetDimension()}D image")
    if any(s < 2 for s in image.GetSize()):
        raise InputError(f"image is too small: size {image.GetSize()}")
    if int(np.prod(image.GetSize())) > MAX_VOXELS:
        raise InputError(f"image is too large: size {image.GetSize()} (at most {MAX_VOXELS} voxels)")
    return image


def _read_gzipped_nifti(path):
    """Read a .nii.gz through an uncompressed temporary copy: ITK's own gzip reading (znzlib) took 7.7 ms for a
    512x512 CT slice here, Python's zlib plus ITK on the plain file 3.6 ms. ITK still parses the header, so the
    geometry is exactly what `sitk.ReadImage` gives. A file that is not gzip after all goes to ITK as it is; a
    truncated or corrupt one is refused (ITK read a truncated file without complaint)."""
    limit = MAX_VOXELS * 8 + 2**20  # the largest volume we accept, in float64, plus header and extensions
    with tempfile.NamedTemporaryFile(suffix=".nii") as plain:
        try:
            with gzip.open(path, "rb") as source:
                written = 0
                while chunk := source.read(2**22):
                    written += len(chunk)
                    if written > limit:
                        raise InputError(f"image is too large: it decompresses to more than {limit // 2**20} MB")
                    plain.write(chunk)
        except OSError:  # not gzip after all (BadGzipFile), missing, unreadable, no room for the copy: ITK decides
            return sitk.ReadImage(path)
        except (EOFError, zlib.error) as error:
            raise InputError(f"the .nii.gz file is truncated or corrupt ({error})") from None
        plain.flush()
        return sitk.ReadImage(plain.name)


def _to_gray(image):
    """RGB(A) photographs of X-rays → luminance, keeping the geometry."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    rgb = array[..., :3]
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32) if rgb.shape[-1] == 3 else rgb[..., 0]
    result = sitk.GetImageFromArray(np.round(gray).astype(np.uint8) if array.max() <= 255 else gray, isVector=False)
    result.SetOrigin(image.GetOrigin())
    result.SetSpacing(image.GetSpacing())
    result.SetDirection(image.GetDirection())
    return result


def image_array(image):
    """Numpy array of a scalar image, in SimpleITK order ((H, W) or (K, J, I)), finite values checked."""
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError("image contains NaN or infinite values")
    return array


def infer_modality(image, array):
    """The DICOM Modality when the file has one (CT → `ct`, MR → `mri`, CR/DX/… → `xray`); otherwise
    `ct` for volumes and HU-range (signed, negative) slices, `xray` for 2D images with unsigned pixels
    (8- or 16-bit PNG/JPEG/DICOM radiographs) or values in 0..255."""
    tag = image.GetMetaData(MODALITY_TAG).strip().upper() if image.HasMetaDataKey(MODALITY_TAG) else ""
    if tag == "CT":
        return "ct"
    if tag == "MR":
        return "mri"
    if image.GetDimension() == 3:
        return "ct"
    if tag in DICOM_XRAY or np.issubdtype(array.dtype, np.unsignedinteger):
        return "xray"
    if float(array.min()) >= 0 and float(array.max()) <= 255 and not _looks_like_hu(array):
        return "xray"
    return "ct"


def _looks_like_hu(array):
    return np.issubdtype(array.dtype, np.signedinteger) and array.dtype.itemsize >= 2 and float(array.min()) < 0


@dataclass(frozen=True)
class VolumeView:
    """Maps a 3D array in file index order (K, J, I) to the axial radiological view [S, P, L] and back."""

    order: tuple  # numpy axes of the file array, in view order
    flips: tuple  # view axes to flip after transposing

    @classmethod
    def of(cls, image):
        direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)  # columns: index axes i, j, k in LPS
        physical = [int(np.argmax(np.abs(direction[:, a]))) for a in range(3)]
        if sorted(physical) != [0, 1, 2]:  # strongly oblique: fall back to the file's own axes
            return cls(order=(0, 1, 2), flips=())
        signs = [np.sign(direction[physical[a], a]) for a in range(3)]
        # numpy axis n ↔ index axis 2 - n; view axis m ↔ physical axis 2 - m (S, P, L)
        order = tuple(next(n for n in range(3) if physical[2 - n] == 2 - m) for m in range(3))
        flips = tuple(m for m in range(3) if signs[2 - order[m]] < 0)
        return cls(order=order, flips=flips)

    @property
    def slice_axis(self):
        """Numpy axis of the file array that runs along the view's slice (S) axis."""
        return self.order[0]

    def to_view(self, array):
        view = np.transpose(array, self.order)
        return np.flip(view, self.flips) if self.flips else view

    def from_view(self, view):
        array = np.flip(view, self.flips) if self.flips else view
        return np.transpose(array, np.argsort(self.order))

    def view_index(self, file_index, n_slices):
        """Index in the view of the slice with index `file_index` along the file's through-plane axis."""
        return n_slices - 1 - file_index if 0 in self.flips else file_index


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
    image = sitk.GetImageFromArray(labels)
    if str(path).endswith(".png"):
        sitk.WriteImage(image, str(path))
        return path
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
