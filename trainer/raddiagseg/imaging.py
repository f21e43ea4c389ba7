"""Reading an image file and the model's view of it, shared by the app (infer, active-learning scoring, training
data) and the trainer (dataset, `raddiagseg predict`), so both feed the model the same array for the same file.

`read_image` gives a SimpleITK image with the file's full geometry and DICOM-correct values: Rescale
Slope/Intercept applied and MONOCHROME1 inverted (both by ITK's GDCM reader), the file's own Window
Center/Width kept (in the displayed polarity). `model_view` turns it into what the model sees: 2D gray slices in
the radiological view (axial slices with rows anterior→posterior and columns patient right→left, i.e. an
LPS-ordered `[S, P, L]` array, whatever the file's direction cosines), and the map back to the file's own index
space for label files. A 2D file and a 3D file with a single slice are one-slice views, so one DICOM of a series
is shown exactly as that slice inside its volume. `ModelView.unit` windows and scales a slice into [0, 1].
"""

import gzip
import os
import re
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np


class _SimpleITK:
    """SimpleITK, imported on first use: reading files needs it, windowing arrays (`to_unit_range`) does not, so a
    model fed arrays runs without it (the GPU checks' machine lacks its 53 MB wheel, more than a lease carries)."""

    def __getattr__(self, name):
        import SimpleITK

        return getattr(SimpleITK, name)


sitk = _SimpleITK()

CT_WINDOW = (40.0, 400.0)  # abdominal soft-tissue window: level, width (HU)
MODALITY_TAG = "0008|0060"  # DICOM Modality
WINDOW_TAGS = ("0028|1050", "0028|1051")  # DICOM Window Center, Window Width (first value of each)
PHOTOMETRIC_TAG = "0028|0004"
BITS_STORED_TAG, SIGNED_TAG = "0028|0101", "0028|0103"
RESCALE_TAGS = ("0028|1053", "0028|1052")  # slope, intercept
DICOM_XRAY = {"CR", "DX", "DR", "RG", "RF", "XA", "PX"}  # projection radiography
KEPT_TAGS = (MODALITY_TAG, *WINDOW_TAGS)  # kept through gray conversion and slicing, for the model view


class InputError(ValueError):
    """The client sent an image or parameter we cannot use: an HTTP `status` and one sentence saying what to fix.

    `InputError(message)` is a 400; the serving layer also raises `InputError(status, message)`.
    """

    def __init__(self, status: int | str, message: str | None = None):
        if message is None:
            status, message = 400, str(status)
        super().__init__(message)
        self.status = int(status)
        self.message = message


def read_image(path, max_voxels=None):
    """Read a 2D/3D scalar image (NIfTI, NRRD, PNG/JPEG, DICOM file or DICOM series folder) with its geometry.

    A 3D file with one slice stays 3D (its label file must keep that geometry); `model_view` shows it as a slice.
    """
    path = str(path)
    try:
        if os.path.isdir(path):
            image = _read_series(path)
        elif path.lower().endswith(".nii.gz"):
            image = _read_gzipped_nifti(path, max_voxels)
        else:
            image = sitk.ReadImage(path)
            if path.lower().endswith(".nii"):
                _check_nifti_finite(path, image)
    except InputError:
        raise
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise InputError(f"cannot read the image as NIfTI/NRRD/PNG/JPEG/DICOM ({first[:200]})") from None
    kept = {key: image.GetMetaData(key) for key in KEPT_TAGS if image.HasMetaDataKey(key)}
    window = _dicom_window(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = _to_gray(image)
    for key, value in kept.items():
        image.SetMetaData(key, value)
    if window is not None:
        image.SetMetaData(WINDOW_TAGS[0], repr(window[0]))
        image.SetMetaData(WINDOW_TAGS[1], repr(window[1]))
    if image.GetDimension() not in (2, 3):
        raise InputError(f"expected a 2D image or a 3D volume, got a {image.GetDimension()}D image")
    if any(s < 2 for s in image.GetSize()[:2]):  # a 3D file may hold one slice, not one row or column
        raise InputError(f"image is too small: size {image.GetSize()}")
    if max_voxels and int(np.prod(image.GetSize())) > max_voxels:
        raise InputError(f"image is too large: size {image.GetSize()} (at most {max_voxels} voxels)")
    return image


def _read_series(path):
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(path)
    if not series:
        raise InputError(f"folder {os.path.basename(path)!r} holds no DICOM series")
    files = reader.GetGDCMSeriesFileNames(path, series[0])
    reader.SetFileNames(files)
    image = reader.Execute()
    first = sitk.ImageFileReader()  # the series' tags (modality, window, polarity) from its first file's header
    first.SetFileName(files[0])
    first.ReadImageInformation()
    for key in (*KEPT_TAGS, PHOTOMETRIC_TAG, BITS_STORED_TAG, SIGNED_TAG, *RESCALE_TAGS):
        if first.HasMetaDataKey(key):
            image.SetMetaData(key, first.GetMetaData(key))
    return image


def _read_gzipped_nifti(path, max_voxels=None):
    """Read a .nii.gz through an uncompressed temporary copy: ITK's own gzip reading (znzlib) took 7.7 ms for a
    512x512 CT slice here, Python's zlib plus ITK on the plain file 3.6 ms. ITK still parses the header, so the
    geometry is exactly what `sitk.ReadImage` gives. A file that is not gzip after all goes to ITK as it is; a
    truncated or corrupt one is refused (ITK read a truncated file without complaint)."""
    limit = (max_voxels or 2**31) * 8 + 2**20  # the largest volume we accept, in float64, plus header and extensions
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
            image = sitk.ReadImage(path)
            _check_nifti_finite(path, image)
            return image
        except (EOFError, zlib.error) as error:
            raise InputError(f"the .nii.gz file is truncated or corrupt ({error})") from None
        plain.flush()
        image = sitk.ReadImage(plain.name)
        _check_nifti_finite(plain.name, image)
        return image


def _check_nifti_finite(path, image):
    """ITK's NIfTI reader turns NaN into 0, so a float NIfTI's stored values are checked as `image_array` checks
    every other format (nibabel reads them as stored, memory-mapped). Integer files (ITK gives integers) hold
    no NaN: they are not opened again (nibabel's header parsing cost 11 ms a slice)."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    import nibabel as nib

    try:
        stored = nib.load(path)
    except Exception:  # ITK read it; nibabel's stricter header checks are not ours to enforce
        return
    if np.issubdtype(stored.get_data_dtype(), np.floating):
        check_finite(np.asanyarray(stored.dataobj))


def check_finite(array):
    """The one NaN/Inf check for every format: such a voxel has no intensity the model could see."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError("image contains NaN or infinite values")


def _dicom_window(image):
    """(level, width) from the file's first Window Center/Width, in the values ITK gives (rescaled, and for
    MONOCHROME1 inverted as GDCM inverts it: max - value, max = 2^BitsStored - 1), or None."""
    if not all(image.HasMetaDataKey(t) for t in WINDOW_TAGS):
        return None
    try:
        level, width = (float(image.GetMetaData(t).split("\\")[0]) for t in WINDOW_TAGS)
    except ValueError:
        return None
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        return None
    if image.HasMetaDataKey(PHOTOMETRIC_TAG) and image.GetMetaData(PHOTOMETRIC_TAG).strip() == "MONOCHROME1":
        bits = int(image.GetMetaData(BITS_STORED_TAG)) if image.HasMetaDataKey(BITS_STORED_TAG) else 16
        signed = image.HasMetaDataKey(SIGNED_TAG) and image.GetMetaData(SIGNED_TAG).strip() == "1"
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        slope, intercept = (float(image.GetMetaData(t)) if image.HasMetaDataKey(t) else d
                            for t, d in zip(RESCALE_TAGS, (1.0, 0.0)))
        level = slope * (low + high) + 2 * intercept - level  # the same window on the inverted values
    return level, width


def file_window(image):
    """The (level, width) the file asks to be shown with (kept by `read_image`), or None."""
    if not all(image.HasMetaDataKey(t) for t in WINDOW_TAGS):
        return None
    return tuple(float(image.GetMetaData(t)) for t in WINDOW_TAGS)


def _to_gray(image):
    """RGB(A) photographs of X-rays → luminance, keeping the geometry."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    rgb = array[..., :3]
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32) if rgb.shape[-1] == 3 else rgb[..., 0]
    stored = sitk.GetArrayViewFromImage(image).dtype  # 16-bit RGB stays unsigned integers (read as an X-ray, not a CT)
    result = sitk.GetImageFromArray(np.round(gray).astype(stored) if np.issubdtype(stored, np.integer) else gray,
                                    isVector=False)
    result.SetOrigin(image.GetOrigin())
    result.SetSpacing(image.GetSpacing())
    result.SetDirection(image.GetDirection())
    return result


def image_array(image):
    """Numpy array of a scalar image, in SimpleITK order ((H, W) or (K, J, I)), finite values checked."""
    array = sitk.GetArrayFromImage(image)
    check_finite(array)
    return array


def is_volume(image):
    """A 3D image with more than one slice (a one-slice file is answered as a slice)."""
    return image.GetDimension() == 3 and image.GetSize()[2] > 1


def dicom_modality(image):
    """The file's DICOM Modality (a code string: upper case, e.g. "CT", "US", "OT"), or "" when it has none."""
    tag = image.GetMetaData(MODALITY_TAG).strip().upper() if image.HasMetaDataKey(MODALITY_TAG) else ""
    return re.sub(r"[^A-Z0-9_]", "", tag)[:16]


def infer_modality(image, array):
    """The DICOM Modality when the file has one (CT → `ct`, MR → `mri`, CR/DX/… → `xray`, any other, e.g. US,
    NM, OT or SEG, as itself in lower case: an ultrasound is never guessed to be an X-ray from its pixels);
    otherwise `ct` for volumes and HU-range (signed, negative) slices, `xray` for 2D images with unsigned pixels
    (8- or 16-bit PNG/JPEG/DICOM radiographs) or values in 0..255."""
    tag = dicom_modality(image)
    if tag:
        return {"CT": "ct", "MR": "mri"}.get(tag) or ("xray" if tag in DICOM_XRAY else tag.lower())
    if is_volume(image):
        return "ct"
    if np.issubdtype(array.dtype, np.unsignedinteger):
        return "xray"
    if float(array.min()) >= 0 and float(array.max()) <= 255 and not _looks_like_hu(array):
        return "xray"
    return "ct"


def _looks_like_hu(array):
    return np.issubdtype(array.dtype, np.signedinteger) and array.dtype.itemsize >= 2 and float(array.min()) < 0


def not_hounsfield(array):
    """Why a CT's values cannot be Hounsfield units, or None.

    Refused rather than flagged: windowing such values as HU gives the model a blank or saturated slice, and an
    answer about that would look as confident as any other. Every CT of a body holds air, lung or fat (below
    0 HU) and spans hundreds of HU; values that never go below 0 are typically HU+1024 stored without a Rescale
    Intercept, a span under 20 normalised (0..1 or z-scored) data. A `window` in the file's own units lifts it.
    """
    low, high = float(array.min()), float(array.max())
    if low >= 0:
        return (f"this CT's values cannot be Hounsfield units: the lowest is {low:g} (a CT holds air and fat below "
                "0 HU; stored as HU+1024 without a Rescale Intercept?)")
    if high - low < 20:
        return (f"this CT's values cannot be Hounsfield units: they span only {low:g}..{high:g} "
                "(normalised data?)")
    return None


@dataclass(frozen=True)
class VolumeView:
    """Maps a 3D array in file index order (K, J, I) to the radiological view and back.

    A volume's view is axial `[S, P, L]`. A one-slice image (2D, or 3D with one slice) keeps its slice: the
    view's slice axis is the file's k axis and the plane is shown radiologically (axial as above; coronal or
    sagittal with superior at the top, patient right or anterior on the left). A 2D image's direction is that of
    a one-slice volume whose k axis runs to S.
    """

    order: tuple  # numpy axes of the file array, in view order
    flips: tuple  # view axes to flip after transposing

    @classmethod
    def of(cls, image):
        direction = np.eye(3)
        dim = image.GetDimension()
        direction[:dim, :dim] = np.array(image.GetDirection(), dtype=float).reshape(dim, dim)  # columns: i, j, k
        physical = [int(np.argmax(np.abs(direction[:, a]))) for a in range(3)]
        if sorted(physical) != [0, 1, 2]:  # strongly oblique: fall back to the file's own axes
            return cls(order=(0, 1, 2), flips=())
        one_slice = dim == 2 or image.GetSize()[2] == 1
        through = physical[2] if one_slice else 2  # physical axis across the slices (L=0, P=1, S=2)
        rows, cols = (p for p in (2, 1, 0) if p != through)  # S before P before L
        view_physical = (through, rows, cols)
        # numpy axis n ↔ index axis 2 - n; a view axis runs to +L/+P/+S, except rows along S (superior on top)
        order = tuple(2 - physical.index(p) for p in view_physical)
        flips = tuple(m for m, p in enumerate(view_physical)
                      if (direction[p, physical.index(p)] < 0) != (m == 1 and p == 2))
        return cls(order=order, flips=flips)

    @property
    def slice_axis(self):
        """Numpy axis of the file array that runs along the view's slice axis."""
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


@dataclass(frozen=True)
class ModelView:
    """The model's view of one image: gray slices in the model's orientation, how to scale them, how to map back."""

    slices: np.ndarray  # (n, H, W) stored values (HU for CT) in the view; read-only when the file array is
    orientation: VolumeView
    file_shape: tuple  # numpy shape of the file's array: (H, W) for a 2D file
    modality: str
    window: tuple = None  # the file's own (level, width), e.g. DICOM Window Center/Width
    hu_problem: str = None  # why a CT's values cannot be HU (`not_hounsfield`), refused by `unit`

    @property
    def n_slices(self):
        return self.slices.shape[0]

    def view_index(self, file_index):
        return self.orientation.view_index(file_index, self.n_slices)

    def window_for(self, window=None):
        """The (level, width) a slice is shown with: `window` (a request's, CT only), else the file's own, else
        (CT) the abdominal one; None: plain min-max. A CT whose values cannot be HU is refused without one."""
        window = (window if self.modality == "ct" else None) or self.window
        if self.modality == "ct" and window is None:
            if self.hu_problem:
                raise InputError(f"{self.hu_problem}; send window [level, width] in the file's units to use them "
                                 "as they are")
            return CT_WINDOW
        return window

    def unit(self, view_index, window=None):
        """Slice `view_index` as the model's float32 [0, 1] input: windowed (`window_for`), then min-max scaled."""
        return to_unit_range(self.slices[view_index], self.modality, self.window_for(window))

    def to_file(self, view_array):
        """A (n, H, W) array in the view → the file's array layout (for label files)."""
        return np.ascontiguousarray(self.orientation.from_view(view_array)).reshape(self.file_shape)


def model_view(image, array=None, modality=None):
    """The model's view of a SimpleITK image (as `read_image` returns it); `modality` overrides the inferred one."""
    array = image_array(image) if array is None else array
    modality = modality or infer_modality(image, array)
    orientation = VolumeView.of(image)
    slices = orientation.to_view(array if array.ndim == 3 else array[np.newaxis])
    return ModelView(slices=slices, orientation=orientation, file_shape=array.shape, modality=modality,
                     window=file_window(image), hu_problem=not_hounsfield(array) if modality == "ct" else None)


def read_slice_view(path, modality="xray"):
    """The model's view of a one-slice file of a dataset (an image or a mask, which must share orientation):
    its stored values are `.slices[0]`. Missing files raise FileNotFoundError, several slices ValueError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file {path}")
    view = model_view(read_image(path), modality=modality)
    if view.n_slices != 1:
        raise InputError(f"{path} is not a 2D slice (it has {view.n_slices} slices)")
    return view


def to_unit_range(image, modality="ct", window=None):
    """Return a float32 copy of a 2D slice scaled to [0, 1].

    CT slices are clipped to `window` (level, width in HU; default abdominal) first, as MedSAM
    does, other modalities only when a `window` is given (a file's own); then every slice is min-max
    scaled. A constant image maps to zeros. NaNs are an error: callers validate input before this point.
    """
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or infinite values")
    if modality == "ct" or window:
        level, width = window or CT_WINDOW
        array = np.clip(array, level - width / 2, level + width / 2)
    low, high = float(array.min()), float(array.max())
    if high - low < 1e-6:
        return np.zeros_like(array)
    return (array - low) / (high - low)
