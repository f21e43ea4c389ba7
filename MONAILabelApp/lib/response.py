"""Turning model answers into the infer response: segments, masks, and the geometry of a volume's view.

Each slice's answer is parsed (`raddiagseg.answers.parse_answer`); the label text written
before each seg token names its mask (canonical vocabulary name, ambiguous synonyms resolved
by the diagnosis). Masks of the same name are merged across seg tokens. A whole volume's slice
answers are combined into 3D findings by `raddiagseg.findings`.
"""

import numpy as np
from raddiagseg.answers import parse_answer

from lib import image_io
from lib import segments as segment_specs


def slice_summary(result, slice_index=None):
    """Parsed view of one GenerationResult: answer, detection, diagnosis, named masks."""
    parsed = parse_answer(result.answer)
    diagnosis = parsed.diagnosis if parsed.detection is True else None  # a Ref-Seg or unreadable answer has none
    named = []
    for segment in result.segments:
        name = segment_specs.canonical_name(segment.label, diagnosis)
        named.append((name, np.asarray(segment.mask, dtype=bool), float(getattr(segment, "score", 0.0))))
    summary = {
        "answer": result.answer,
        "detection": parsed.detection,
        "diagnosis": diagnosis,
        "segments": list(dict.fromkeys(name for name, _, _ in named)),
    }
    if parsed.reasoning:  # chain-of-thought answers: the reasoning before the conclusion
        summary["reasoning"] = parsed.reasoning
    if getattr(result, "agreement", None):  # test-time scaling: how much the paths agreed
        summary["agreement"] = result.agreement
    if slice_index is not None:
        summary = {"slice": int(slice_index), **summary}
    return summary, named


def view_to_lps(view, image, view_shape):
    """4x4 matrix from a voxel index (slice, row, col) of the view array of `view` to LPS millimetres.

    The whole-volume findings are measured with it (`raddiagseg.findings`), so oblique and anisotropic
    files are measured in their own physical geometry."""
    to_file = np.zeros((4, 4))  # view index -> file numpy index (K, J, I)
    to_file[3, 3] = 1.0
    for n in range(3):
        m = view.order.index(n)  # file numpy axis n runs along view axis m (VolumeView.from_view)
        if m in view.flips:
            to_file[n, m], to_file[n, 3] = -1.0, view_shape[m] - 1
        else:
            to_file[n, m] = 1.0
    numpy_to_itk = np.zeros((4, 4))
    numpy_to_itk[0, 2] = numpy_to_itk[1, 1] = numpy_to_itk[2, 0] = numpy_to_itk[3, 3] = 1.0
    return image_io.ijk_to_lps(image) @ numpy_to_itk @ to_file


def collect_segments(named_per_slice, view_shape, to_file):
    """Segment descriptions (label values 1..N) and merged boolean masks in the file's array layout.

    `named_per_slice`: [(view slice index, or None for a 2D image, [(name, mask2d, score)])];
    masks are merged in the view (`view_shape`) and mapped back with `to_file(view_array)`.
    """
    order, masks = [], {}
    for index, named in named_per_slice:
        for name, mask2d, _ in named:
            if name not in masks:
                order.append(name)
                masks[name] = np.zeros(view_shape, dtype=bool)
            if index is None:
                masks[name] |= mask2d
            else:
                masks[name][index] |= mask2d
    return segment_specs.assign(order), {name: np.ascontiguousarray(to_file(m)) for name, m in masks.items()}
