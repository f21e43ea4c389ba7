"""Turning per-slice model answers into the infer response: segments, masks and a volume summary.

Each slice's answer is parsed (`raddiagseg.answers.parse_answer`); the label text written
before each seg token names its mask (canonical vocabulary name, ambiguous synonyms resolved
by the diagnosis). Masks of the same name are merged, across seg tokens and across slices.
"""

from collections import Counter

import numpy as np
from raddiagseg import templates
from raddiagseg.answers import parse_answer

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


def volume_summary(slice_summaries):
    """Whole-volume verdict: abnormal if any slice is; the most frequent diagnosis of the positive slices."""
    positives = [s for s in slice_summaries if s["detection"]]
    diagnoses = Counter(s["diagnosis"] for s in positives if s["diagnosis"])
    diagnosis = diagnoses.most_common(1)[0][0] if diagnoses else None
    unreadable = [s["slice"] for s in slice_summaries if s["detection"] is None]
    return {
        "n_slices": len(slice_summaries),
        "detection": bool(positives),
        "diagnosis": diagnosis,
        "positive_slices": [s["slice"] for s in positives],
        "unreadable_slices": unreadable,
        "diagnosis_votes": dict(diagnoses),
    }


def volume_answer(detection, diagnosis, names):
    """The 3-step answer for a whole volume, written with the same template the model learns."""
    names = list(names)[: templates.NUM_SEG_TOKENS]
    return templates.vqaseg_answer(detection, diagnosis or "abnormality of uncertain type", names)


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
