"""Uploaded images and labels: saved to a private temp file, then checked in bounded time and memory.

What a check refuses, in the order it looks:

- a file that is not self-contained: detached-header formats (``.mhd``, ``.nhdr``, a NIfTI
  header/image pair) and headers naming a data file are refused from their first bytes, before
  any image reader opens them, so an upload can never make the server read, or probe for, one
  of its own files; so is a NRRD with ``byte skip``/``line skip`` (ITK skips through a gzip
  stream byte by byte: a 0.5 MB file skipping 512 MB held the check for over 5 minutes);
- a format other than the one its name says (the reader is chosen from the name, not sniffed);
- a declared size (header dimensions x bytes per voxel, plus a NIfTI's offset to its pixel data)
  above the limits, before any pixel data is inflated: a 2 MB ``.nii.gz`` that would inflate to
  2 GB is refused after its header, as is one whose ``vox_offset`` puts 2 GB of zeros before a
  few voxels;
- pixel data that is short, carries trailing bytes, or holds NaN/Inf (and, for labels,
  non-integer values or values outside 0..255). NIfTI is read as a stream in fixed-size chunks
  with a byte cap; other formats into one buffer of the (already bounded) declared size.

At most ``CHECK_WORKERS`` uploads are checked at once, on their own threads, so peak memory is
bounded and the event loop keeps answering ``/info/`` while a large upload is checked.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import math
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .validation import InputError, Limits

# name suffix -> the ITK reader that must read it; only self-contained formats
READERS = {
    ".nii.gz": "NiftiImageIO", ".nii": "NiftiImageIO", ".nrrd": "NrrdImageIO", ".mha": "MetaImageIO",
    ".png": "PNGImageIO", ".jpg": "JPEGImageIO", ".jpeg": "JPEGImageIO", ".dcm": "GDCMImageIO",
}
DETACHED = (".mhd", ".nhdr", ".hdr", ".img", ".raw")
CHUNK_BYTES = 8 * 1024 * 1024
HEADER_BYTES = 64 * 1024  # text headers (NRRD, MetaImage) must end within this
TRAILING_SLACK = 64 * 1024  # bytes after a NIfTI's pixel data we tolerate (never inflated further)
CHECK_WORKERS = 1
UPLOAD_PREFIX = "raddiag-upload-"  # + the server's pid: a file whose server is gone was orphaned by a kill
_checks = ThreadPoolExecutor(max_workers=CHECK_WORKERS, thread_name_prefix="upload-check")


@dataclass
class Checked:
    """What a check learned about an upload: enough to compare a label with its image."""

    size: tuple  # (x, y[, z]) without trailing singleton dimensions beyond 3
    spacing: tuple
    origin: tuple
    direction: tuple
    values: tuple = ()  # label values present (labels only)
    slices: int | None = None  # how many slices a label info `slice` may index; None for a 2D image


def slice_count(reader) -> int | None:
    """Slices along the axis training reads a label info ``slice`` on (the through-plane axis of the
    model's view, ``raddiagseg.imaging.VolumeView``), from a header read; None for a 2D image."""
    from raddiagseg.imaging import VolumeView

    if reader.GetDimension() != 3:
        return None
    return int(reader.GetSize()[2 - VolumeView.of(reader).slice_axis])


def upload_suffix(filename: str | None) -> str:
    """The file type from an upload's name; only self-contained image formats are accepted."""
    name = (filename or "").lower()
    for suffix in sorted(READERS, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    if name.endswith(DETACHED):
        raise InputError(415, "detached-header images (.mhd, .nhdr, .hdr/.img) are not accepted: their header "
                              "points at a separate data file; send one self-contained file (.nii.gz, .nrrd, .mha)")
    shown = os.path.splitext(name)[1] or "(none)"
    raise InputError(415, f"unsupported file type {shown[:20]!r}; send one of {', '.join(READERS)}")


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _refuse_data_file_reference(path: str, suffix: str, what: str) -> None:
    """NRRD and MetaImage headers may name another file holding the pixels; refuse any that do."""
    if suffix not in (".nrrd", ".mha"):
        return
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if suffix == ".nrrd":
        if not head.startswith(b"NRRD"):
            raise InputError(400, f"the uploaded {what} is not a NRRD file (no NRRD magic)")
        end = head.find(b"\n\n")
        lines = head[: end if end >= 0 else len(head)].splitlines()
        if any(re.match(rb"\s*data\s*file\s*:", line, re.IGNORECASE) for line in lines):
            raise InputError(400, f"the uploaded {what} is a NRRD header naming a separate data file; "
                                  "send a NRRD with its pixel data attached")
        if any(re.match(rb"\s*(byte|line)\s*skip\s*:\s*(?!0*\s*$)", line, re.IGNORECASE) for line in lines):
            # ITK skips these through a gzip stream byte by byte: 512 MB of skipped zeros held the check for minutes
            raise InputError(400, f"the uploaded {what} is a NRRD with 'byte skip' or 'line skip'; send a NRRD "
                                  "whose pixel data follows its header")
        if end < 0:
            raise InputError(400, f"the uploaded {what} has a NRRD header longer than {HEADER_BYTES} bytes")
        return
    match = re.search(rb"^\s*ElementDataFile\s*=\s*(\S+)", head, re.MULTILINE)
    if match is None:
        raise InputError(400, f"the uploaded {what} is not a MetaImage file (no ElementDataFile in its header)")
    if match.group(1) != b"LOCAL":
        raise InputError(400, f"the uploaded {what} is a MetaImage header naming a separate data file; "
                              "send a .mha with ElementDataFile = LOCAL")


def _nifti_header(path: str, what: str):
    """The NIfTI-1/2 header of a single-file NIfTI (magic n+1/n+2), read from its first bytes."""
    import nibabel
    from nibabel.spatialimages import HeaderDataError

    try:
        with _open(path) as f:
            head = f.read(540)
    except (OSError, EOFError):
        raise InputError(400, f"the uploaded {what} could not be read: not a NIfTI or a corrupt file") from None
    for cls in (nibabel.Nifti1Header, nibabel.Nifti2Header):
        if len(head) < cls.template_dtype.itemsize:
            continue
        try:
            header = cls.from_fileobj(io.BytesIO(head[: cls.template_dtype.itemsize]), check=True)
        except (HeaderDataError, ValueError):  # not this NIfTI version
            continue
        magic = bytes(header["magic"]).rstrip(b"\0")
        if magic in (b"ni1", b"ni2"):
            raise InputError(400, f"the uploaded {what} is a NIfTI header of a header/image pair; "
                                  "send a single-file .nii or .nii.gz")
        if magic in (b"n+1", b"n+2"):
            return header
    raise InputError(400, f"the uploaded {what} could not be read: not a NIfTI or a corrupt file")


class _VoxelCheck:
    """Accumulates chunk by chunk what the whole array must satisfy."""

    def __init__(self, what: str, label: bool):
        self.what, self.label = what, label
        self.values = set()

    def add(self, chunk: np.ndarray) -> None:
        if chunk.size == 0:
            return
        if np.issubdtype(chunk.dtype, np.floating):
            if not np.isfinite(chunk).all():
                raise InputError(400, f"the uploaded {self.what} contains NaN or infinite values")
            if self.label and not np.array_equal(chunk, np.round(chunk)):
                raise InputError(400, "the uploaded label has non-integer values; send label values 0..N")
        if self.label:
            if chunk.min() < 0 or chunk.max() > 255:
                raise InputError(400, "the uploaded label has values outside 0..255; send label values 0..N")
            self.values.update(int(v) for v in np.flatnonzero(np.bincount(chunk.astype(np.uint8).ravel())))


def _check_nifti_voxels(path: str, header, declared: int, check: _VoxelCheck) -> None:
    """Stream a NIfTI's pixel data in chunks (inflating a .gz as it goes), never more than declared."""
    dtype = header.get_data_dtype()
    slope, inter = header.get_slope_inter()
    scaled = (slope not in (None, 1.0)) or (inter not in (None, 0.0))
    if scaled and not (math.isfinite(slope or 1.0) and math.isfinite(inter or 0.0)):
        raise InputError(400, f"the uploaded {check.what} has a non-finite intensity scaling in its header")
    offset = int(header.get_data_offset())
    step = max(dtype.itemsize, CHUNK_BYTES - CHUNK_BYTES % dtype.itemsize)
    try:
        with _open(path) as f:
            skipped = 0
            while skipped < offset:  # in chunks: the offset is inflated too, and counted in the limit
                data = f.read(min(CHUNK_BYTES, offset - skipped))
                if not data:
                    raise InputError(400, f"the uploaded {check.what} is truncated: it ends inside its header")
                skipped += len(data)
            remaining = declared
            while remaining:
                data = f.read(min(step, remaining))
                if len(data) < min(step, remaining):
                    raise InputError(400, f"the uploaded {check.what} is truncated: {declared - remaining + len(data)} "
                                          f"of {declared} bytes of pixel data")
                remaining -= len(data)
                chunk = np.frombuffer(data, dtype=dtype)
                check.add(chunk * (slope or 1.0) + (inter or 0.0) if scaled else chunk)
            if len(f.read(TRAILING_SLACK + 1)) > TRAILING_SLACK:
                raise InputError(400, f"the uploaded {check.what} has more data after its pixel data than its "
                                      "header declares")
    except InputError:  # a ValueError too, but already the answer
        raise
    except (OSError, EOFError, gzip.BadGzipFile, ValueError):
        raise InputError(400, f"the uploaded {check.what} is truncated or corrupt: its pixel data could not be read") from None


def _check_itk_voxels(path: str, io_name: str, check: _VoxelCheck) -> None:
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io_name)
    reader.SetFileName(path)
    try:
        image = reader.Execute()  # held here: an array view of an image that is freed reads freed memory
    except RuntimeError:
        raise InputError(400, f"the uploaded {check.what} is truncated or corrupt: its pixel data could not be read") from None
    array = sitk.GetArrayViewFromImage(image)
    for plane in array.reshape(-1, *array.shape[-2:]) if array.ndim >= 2 else [array]:
        check.add(plane)


def check_image_file(path: str, limits: Limits, what: str = "image", label: bool = False) -> Checked:
    """Open an uploaded image within the limits and refuse what the model cannot use."""
    suffix = upload_suffix(path)
    nbytes = os.path.getsize(path)
    if nbytes == 0:
        raise InputError(400, f"the uploaded {what} file is empty")
    if nbytes > limits.max_upload_bytes:
        raise InputError(413, f"the uploaded {what} is {nbytes} bytes; the limit is {limits.max_upload_bytes}")
    _refuse_data_file_reference(path, suffix, what)
    header = _nifti_header(path, what) if READERS[suffix] == "NiftiImageIO" else None

    reader = sitk.ImageFileReader()
    reader.SetImageIO(READERS[suffix])
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(400, f"the uploaded {what} could not be read: not a {suffix} image or a corrupt file") from None
    size = tuple(int(s) for s in reader.GetSize())
    if len(size) > 3 and any(s > 1 for s in size[3:]):
        raise InputError(400, f"the uploaded {what} is {len(size)}D {size}; send a 2D slice or a 3D volume")
    size = size[:3]
    if reader.GetNumberOfComponents() != 1:
        raise InputError(400, f"the uploaded {what} has {reader.GetNumberOfComponents()} channels (RGB?); "
                              "send a single-channel grayscale image")
    if any(s == 0 for s in size):
        raise InputError(400, f"the uploaded {what} has an empty dimension {size}")
    if max(size) > limits.max_side or math.prod(size) > limits.max_voxels:
        raise InputError(413, f"the uploaded {what} is {size}; limits are {limits.max_side} per side and "
                              f"{limits.max_voxels} voxels")
    if header is not None:
        declared = int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
        inflated = declared + int(header.get_data_offset())  # what lies before the pixel data is inflated too
    else:
        itemsize = sitk.GetArrayViewFromImage(sitk.Image([1] * len(size), reader.GetPixelID())).itemsize
        declared = inflated = math.prod(size) * itemsize
    if inflated > limits.max_decoded_bytes:
        raise InputError(413, f"the uploaded {what} would decompress to {inflated} bytes; the limit is "
                              f"{limits.max_decoded_bytes}")

    check = _VoxelCheck(what, label)
    if header is not None:
        _check_nifti_voxels(path, header, declared, check)
    else:
        _check_itk_voxels(path, READERS[suffix], check)
    dim = len(size)
    return Checked(size=size, spacing=tuple(reader.GetSpacing())[:dim], origin=tuple(reader.GetOrigin())[:dim],
                   direction=tuple(reader.GetDirection()), values=tuple(sorted(check.values)), slices=slice_count(reader))


async def check_upload(path: str, limits: Limits, what: str, label: bool = False) -> Checked:
    """``check_image_file`` on the bounded check pool."""
    return await asyncio.get_running_loop().run_in_executor(_checks, check_image_file, path, limits, what, label)


async def save_upload(upload, limits: Limits, what: str, label: bool = False) -> tuple[str, Checked]:
    """Copy a multipart upload to a private temp file and check it; the caller removes the file,
    which is already gone when this raises."""
    suffix = upload_suffix(upload.filename if upload is not None else None)
    fd, path = tempfile.mkstemp(suffix=suffix, prefix=f"{UPLOAD_PREFIX}{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as out:
            total = 0
            while chunk := await upload.read(1024 * 1024):
                total += len(chunk)
                if total > limits.max_upload_bytes:
                    raise InputError(413, f"the uploaded {what} exceeds {limits.max_upload_bytes} bytes")
                out.write(chunk)
        return path, await check_upload(path, limits, what, label)
    except BaseException:
        remove_file(path)
        raise


def remove_orphaned_uploads(folder: str | None = None) -> list[str]:
    """Delete upload temp files of servers that no longer run (killed mid-upload: nothing could remove
    them then); another running server's files stay. Returns the paths removed."""
    folder = folder or tempfile.gettempdir()
    removed = []
    for name in os.listdir(folder):
        match = re.match(re.escape(UPLOAD_PREFIX) + r"(\d+)-", name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # that server still runs (or the pid was reused: keep the file, the safe side)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        remove_file(os.path.join(folder, name))
        removed.append(os.path.join(folder, name))
    return removed


def remove_file(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
