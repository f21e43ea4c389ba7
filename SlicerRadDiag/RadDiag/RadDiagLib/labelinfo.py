"""Label info sent with a corrected label map (PUT /datastore/label `params`).

The server's train task turns a saved correction into training samples, so the label info
must say what the corrected image shows: the answer text (seg tokens in export order),
detection, diagnosis and which label value is which named segment.
"""

from .constants import DEFAULT_QUESTION
from .segments import export_order

# raddiagseg.templates' seg tokens, copied: RadDiagLib runs in Slicer's Python, which cannot import raddiagseg (torch);
# tests/test_slicer_lib.py checks that the two agree
SEG_TOKEN = "<seg{:03d}>"
MAX_SEG_TOKENS = 16


def compose_answer(detection, diagnosis=None, segment_names=()):
    """The 3-step answer in the model's template (same text as raddiagseg.templates.vqaseg_answer)."""
    if not detection:
        return "1. No"
    if len(segment_names) > MAX_SEG_TOKENS:
        raise ValueError(f"at most {MAX_SEG_TOKENS} segments per answer, got {len(segment_names)}")
    lines = ["1. Yes", f"2. {diagnosis}"]
    if segment_names:
        lines.append("3. Segmentation masks:" if len(segment_names) > 1 else "3. Segmentation mask:")
        lines += [f"- {name} {SEG_TOKEN.format(i)}" for i, name in enumerate(segment_names)]
    return "\n".join(lines)


def build_label_info(specs, detection, diagnosis=None, answer=None, question=DEFAULT_QUESTION,
                     slice_index=None, model=None, extra=None):
    """Label info for a correction whose label map was exported in `export_order(specs)`.

    `specs` are the current segments (names/roles/colours possibly edited by the user); their
    label values in the saved map are their 1-based positions in export order, and that is
    what the returned `segments` and `label_names` say. `answer` defaults to the template
    answer built from detection, diagnosis and the segment names; pass the user's edited text
    to keep it verbatim.
    """
    diagnosis = (diagnosis or "").strip() or None
    if detection and not diagnosis:
        raise ValueError("a positive finding needs a diagnosis: type it in the Diagnosis box")
    ordered = export_order(specs)
    names = [s.name for s in ordered] if detection else []
    segments = []
    for position, spec in enumerate(ordered, start=1):
        entry = spec.to_dict()
        entry["label_value"] = position
        segments.append(entry)
    info = {
        "question": question or DEFAULT_QUESTION,
        "answer": answer.strip() if answer and answer.strip() else compose_answer(detection, diagnosis, names),
        "detection": bool(detection),
        "diagnosis": diagnosis if detection else None,
        "segments": segments,
        "label_names": {s["name"]: s["label_value"] for s in segments},
        "client": "RadDiag Slicer extension",
    }
    if slice_index is not None:
        info["slice"] = int(slice_index)
    if model:
        info["model"] = model
    info.update(extra or {})
    return info
