"""Intensity normalisation of a 2D slice into the model's [0, 1] input, shared by data, training, evaluation and the app."""

import numpy as np

CT_WINDOW = (40.0, 400.0)  # abdominal soft-tissue window: level, width (HU)


def to_unit_range(image, modality="ct", window=None):
    """Return a float32 copy of a 2D slice scaled to [0, 1].

    CT slices are clipped to `window` (level, width in HU; default abdominal) first, as MedSAM
    does, then every modality is min-max scaled. A constant image maps to zeros. NaNs are an
    error: callers validate input before this point.
    """
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or infinite values")
    if modality == "ct":
        level, width = window or CT_WINDOW
        array = np.clip(array, level - width / 2, level + width / 2)
    low, high = float(array.min()), float(array.max())
    if high - low < 1e-6:
        return np.zeros_like(array)
    return (array - low) / (high - low)
