"""Which slice the user is looking at, as the server counts slices.

The server's `slice` parameter is an index along the file's through-plane axis: the voxel
(IJK) axis whose direction is closest to superior-inferior. The module gets the volume's
IJK→RAS matrix and the slice view's centre in RAS from Slicer; the arithmetic is here.
"""

import numpy as np


def through_plane_axis(ijk_to_ras):
    """IJK axis (0, 1 or 2) whose direction is most aligned with S (the axial slice normal)."""
    matrix = np.asarray(ijk_to_ras, dtype=float)[:3, :3]
    directions = matrix / np.linalg.norm(matrix, axis=0, keepdims=True)
    return int(np.argmax(np.abs(directions[2, :])))


def slice_index_at(ijk_to_ras, dimensions, ras_point):
    """Index along the through-plane axis of the slice containing `ras_point`.

    Raises ValueError (with what to do) when the point lies outside the volume.
    """
    matrix = np.asarray(ijk_to_ras, dtype=float)
    ijk = np.linalg.solve(matrix, np.append(np.asarray(ras_point, dtype=float)[:3], 1.0))[:3]
    axis = through_plane_axis(matrix)
    index = int(np.floor(ijk[axis] + 0.5))
    count = int(dimensions[axis])
    if not 0 <= index < count:
        raise ValueError(f"the current slice is outside the volume (slice {index} of 0..{count - 1}): "
                         "scroll the red view into the volume or choose 'Whole volume'")
    return index


def modality_hint(dimensions, scalar_range):
    """"xray" for a single-slice image with 8-bit values, else None (the server decides).

    Slicer holds a loaded PNG/JPEG X-ray as a one-slice volume; sent as NRRD it would look like
    a thin CT to the server, so the module says what it is.
    """
    if 1 not in tuple(int(d) for d in dimensions):
        return None
    low, high = float(scalar_range[0]), float(scalar_range[1])
    return "xray" if 0.0 <= low and high <= 255.0 else None
