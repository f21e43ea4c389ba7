"""Read (and write) label maps and Slicer `.seg.nrrd` files without pynrrd or slicerio.

Slicer bundles numpy and SimpleITK but neither pynrrd nor slicerio, so NRRD is handled by the
small reader/writer here (attached raw or gzip data, the encodings Slicer and MONAI write).
Other formats (NIfTI) go through SimpleITK when it is importable.
"""

import gzip
import os
import re

import numpy as np

from .segments import SegmentSpec, match_file_segments

_NRRD_TYPES = {
    "int8": "i1", "signed char": "i1", "char": "i1",
    "uint8": "u1", "uchar": "u1", "unsigned char": "u1",
    "int16": "i2", "short": "i2", "short int": "i2", "signed short": "i2", "signed short int": "i2",
    "uint16": "u2", "ushort": "u2", "unsigned short": "u2", "unsigned short int": "u2",
    "int32": "i4", "int": "i4", "signed int": "i4",
    "uint32": "u4", "uint": "u4", "unsigned int": "u4",
    "int64": "i8", "longlong": "i8", "long long": "i8", "long long int": "i8", "signed long long int": "i8",
    "uint64": "u8", "ulonglong": "u8", "unsigned long long": "u8", "unsigned long long int": "u8",
    "float": "f4", "double": "f8",
}
_WRITE_TYPES = {"u1": "uint8", "i1": "int8", "u2": "uint16", "i2": "int16", "u4": "uint32", "i4": "int32",
                "f4": "float", "f8": "double"}


class LabelMapError(ValueError):
    pass


def _vector(text):
    text = text.strip()
    if text == "none":
        return None
    return [float(v) for v in text.strip("()").split(",")]


def read_nrrd_header(f):
    """Parse the header of an open binary NRRD file; leaves `f` at the start of the data."""
    magic = f.readline().decode("ascii", "replace").strip()
    if not magic.startswith("NRRD000"):
        raise LabelMapError("not a NRRD file (missing the NRRD000x magic line)")
    header = {}
    while True:
        line = f.readline()
        if not line:
            break
        line = line.decode("utf-8", "replace").rstrip("\r\n")
        if line == "":
            break
        if line.startswith("#"):
            continue
        if ":=" in line:
            key, value = line.split(":=", 1)
            header[key] = value
        elif ": " in line:
            key, value = line.split(": ", 1)
            header[key.strip().lower()] = value.strip()
    return header


def read_nrrd(path):
    """(array indexed [i, j, k] (plus leading list axes as in the file), header dict)."""
    with open(path, "rb") as f:
        header = read_nrrd_header(f)
        if "data file" in header or "datafile" in header:
            raise LabelMapError(f"{os.path.basename(path)}: detached NRRD data files are not supported; save as .nrrd with data attached")
        raw = f.read()
    dtype_code = _NRRD_TYPES.get(header.get("type", "").lower())
    if dtype_code is None:
        raise LabelMapError(f"unsupported NRRD type {header.get('type')!r}")
    encoding = header.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz"):
        raw = gzip.decompress(raw)
    elif encoding != "raw":
        raise LabelMapError(f"unsupported NRRD encoding {encoding!r} (use raw or gzip)")
    endian = "<" if header.get("endian", "little").lower() == "little" else ">"
    sizes = [int(s) for s in header["sizes"].split()]
    count = int(np.prod(sizes))
    dtype = np.dtype(endian + dtype_code)
    if len(raw) < count * dtype.itemsize:
        raise LabelMapError(f"{os.path.basename(path)}: data is shorter than its sizes {sizes} say")
    data = np.frombuffer(raw[:count * dtype.itemsize], dtype=dtype)
    return data.reshape(sizes, order="F"), header


def nrrd_geometry(header):
    """(origin, direction columns scaled by spacing as a 3x3 matrix) in the NRRD's space, or None."""
    directions = header.get("space directions")
    if not directions:
        return None
    vectors = [_vector(v) for v in re.findall(r"\([^)]*\)|none", directions)]
    vectors = [v for v in vectors if v is not None]
    origin = _vector(header.get("space origin", "(0,0,0)"))
    return np.array(origin), np.array(vectors).T


def write_nrrd(path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), directions=None,
               space="left-posterior-superior", extra=None, compress=True):
    """Write a 2D/3D array indexed [i, j, k] as an attached-data NRRD (gzip by default)."""
    array = np.asarray(array)
    code = array.dtype.str[1:]
    if code not in _WRITE_TYPES:
        raise LabelMapError(f"cannot write dtype {array.dtype} to NRRD")
    dim = array.ndim
    if directions is None:
        directions = np.eye(dim)
    directions = np.asarray(directions, float) * np.asarray(spacing, float)[None, :dim]
    fmt = lambda v: "(" + ",".join(repr(float(x)) for x in v) + ")"
    lines = ["NRRD0004", f"type: {_WRITE_TYPES[code]}", f"dimension: {dim}", f"space: {space}" if dim == 3 else f"space dimension: {dim}",
             "sizes: " + " ".join(str(s) for s in array.shape),
             "space directions: " + " ".join(fmt(directions[:, a]) for a in range(dim)),
             "kinds: " + " ".join(["domain"] * dim), "endian: little",
             f"encoding: {'gzip' if compress else 'raw'}", f"space origin: {fmt(origin[:dim])}"]
    for key, value in (extra or {}).items():
        lines.append(f"{key}:={value}")
    data = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<")).ravel(order="F")).tobytes()
    if compress:
        data = gzip.compress(data, compresslevel=6)
    with open(path, "wb") as f:
        f.write(("\n".join(lines) + "\n\n").encode("utf-8"))
        f.write(data)


def read_label_array(path):
    """Voxels of a label file as a numpy array. NRRD: own reader; others: SimpleITK (bundled in Slicer)."""
    if path.lower().endswith(".nrrd") or path.lower().endswith(".nhdr"):
        return read_nrrd(path)[0]
    try:
        import SimpleITK as sitk
    except ImportError:
        try:
            import nibabel
        except ImportError as e:
            raise LabelMapError(f"reading {os.path.basename(path)} needs SimpleITK or nibabel") from e
        return np.asarray(nibabel.load(path).dataobj)
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def present_label_values(path, specs=()):
    """Label values (the response's, `specs`) that have at least one voxel in a label file.

    For a `.seg.nrrd` the file's segments are matched to `specs` (segments.match_file_segments)
    and each layer is searched for the file's own label value of the segment.
    """
    array = read_label_array(path)
    if path.lower().endswith(".seg.nrrd"):
        file_segments = seg_nrrd_segments(read_nrrd(path)[1])
        matched = match_file_segments([spec for spec, _layer in file_segments], list(specs))
        present = set()
        for (file_spec, layer), spec in zip(file_segments, matched):
            layer_array = array[layer] if array.ndim == 4 else array
            if spec is not None and np.any(layer_array == file_spec.label_value):
                present.add(spec.label_value)
        return present
    values = set(int(v) for v in np.unique(array))
    values.discard(0)
    return values


def _tags(text):
    tags = {}
    for item in (text or "").split("|"):
        if ":" in item:
            key, value = item.split(":", 1)
            tags[key] = value
    return tags


def seg_nrrd_segments(header):
    """[(SegmentSpec, layer)] from a .seg.nrrd header's SegmentN_* keys, in segment order."""
    result = []
    index = 0
    while f"Segment{index}_ID" in header or f"Segment{index}_Name" in header:
        prefix = f"Segment{index}_"
        name = header.get(prefix + "Name", header.get(prefix + "ID", f"Segment_{index + 1}"))
        color = [float(c) for c in header.get(prefix + "Color", "0.5 0.5 0.5").split()]
        tags = _tags(header.get(prefix + "Tags", ""))
        spec = SegmentSpec(name, int(header.get(prefix + "LabelValue", index + 1)),
                           role=tags.get("RadDiag.Role", ""),
                           color=tuple(int(round(c * 255)) for c in color),
                           terminology=tags.get("TerminologyEntry", ""))
        result.append((spec, int(header.get(prefix + "Layer", 0))))
        index += 1
    return result
