"""The label info a client saves with a corrected label (`PUT /datastore/label`, form field `params`).

Keys (all optional except a way to name the label values):

    segments     [{"name": "liver", "label_value": 1, "role": "organ"}, ...]   which value is which target
    label_names  {"liver": 1, "liver tumour": 2}     same, MONAI Label style (used when `segments` is absent)
    detection    true | false                        is there an abnormality (step 1)
    diagnosis    "Liver tumour" | null               the corrected diagnosis (step 2)
    answer       "1. Yes\\n2. Liver tumour\\n..."     the corrected answer text; read for detection/diagnosis
                                                     when those keys are absent
    question     the question the answer belongs to  (default: the 3-step question)
    slice        k | null                            3D only: the corrected slice, index along the file's
                                                     through-plane axis; null = every slice with labels
    modality     "ct" | "xray" | "mri"               default: inferred from the image

The infer response's `segments`/`label_names` have the same shape, so a client can send back
what it received after editing. Validation errors name the key to fix.
"""

from dataclasses import dataclass

from raddiagseg import templates
from raddiagseg.answers import parse_answer

from lib import segments as segment_specs


class LabelInfoError(ValueError):
    pass


@dataclass
class LabelInfo:
    segments: list  # [(canonical name, label value, role)] ordered by label value
    detection: bool | None
    diagnosis: str | None
    question: str
    slice: int | None
    modality: str | None


def parse(info):
    """LabelInfo from the JSON dict stored with a label."""
    if not isinstance(info, dict):
        raise LabelInfoError("label info must be a JSON object")
    raw = info.get("segments")
    pairs = []
    if raw:
        if not isinstance(raw, list):
            raise LabelInfoError("segments must be a list of {name, label_value}")
        for item in raw:
            try:
                pairs.append((str(item["name"]), int(item["label_value"]), item.get("role")))
            except (KeyError, TypeError, ValueError):
                raise LabelInfoError("each segment needs a name and an integer label_value") from None
    elif isinstance(info.get("label_names"), dict):
        try:
            pairs = [(str(k), int(v), None) for k, v in info["label_names"].items() if str(k).lower() != "background"]
        except (TypeError, ValueError):
            raise LabelInfoError("label_names must map names to integer label values") from None
    if any(not 1 <= value <= 255 for _, value, _ in pairs):
        raise LabelInfoError("label values must be between 1 and 255")

    answer = info.get("answer")
    parsed = parse_answer(answer) if isinstance(answer, str) and answer.strip() else None
    detection = info.get("detection", parsed.detection if parsed else None)
    if detection is not None and not isinstance(detection, bool):
        raise LabelInfoError("detection must be true, false or null")
    diagnosis = info.get("diagnosis", parsed.diagnosis if parsed else None)
    if diagnosis is not None and not isinstance(diagnosis, str):
        raise LabelInfoError("diagnosis must be text or null")

    segments = []
    for name, value, role in sorted(pairs, key=lambda p: p[1]):
        canonical = segment_specs.canonical_name(name, diagnosis)
        entry = templates.targets().get(canonical)
        segments.append((canonical, value, role or (entry["role"] if entry else "unknown")))

    slice_index = info.get("slice")
    if slice_index is not None and (isinstance(slice_index, bool) or not isinstance(slice_index, int) or slice_index < 0):
        raise LabelInfoError("slice must be a non-negative integer or null")
    return LabelInfo(
        segments=segments,
        detection=detection,
        diagnosis=diagnosis.strip() if isinstance(diagnosis, str) and diagnosis.strip() else None,
        question=info.get("question") or templates.DEFAULT_QUESTION,
        slice=slice_index,
        modality=info.get("modality"),
    )
