"""The label info a client saves with a corrected label (`PUT /datastore/label`, form field `params`).

Keys (all optional except a way to name the label values):

    segments     [{"name": "liver", "label_value": 1, "role": "organ"}, ...]   which value is which target
    label_names  {"liver": 1, "liver tumour": 2}     same, MONAI Label style (used when `segments` is absent)
    label_info   [{"name": "liver", "idx": 1}, ...]  same, as the stock MONAI Label Slicer plugin saves it
                                                     (`idx` = label value; without it, position + 1)
    detection    true | false                        is there an abnormality (step 1)
    diagnosis    "Liver tumour" | null               the corrected diagnosis (step 2); when neither it
                                                     nor `answer` is given, the diagnosis whose
                                                     abnormality is one of the named segments
    answer       "1. Yes\\n2. Liver tumour\\n..."     the corrected answer text; read for detection/diagnosis
                                                     when those keys are absent
    question     the question the answer belongs to  (default: the 3-step question)
    slice        k | null                            3D only: the corrected slice, index along the file's
                                                     through-plane axis; null = every slice with labels
    modality     "ct" | "xray" | "mri"               default: inferred from the image

Names are mapped to the vocabulary (`raddiagseg/resources/vocabulary.json`: canonical names and
synonyms, any case). A name it does not know is not trained on (`LabelInfo.unknown`, with the
reason `unknown_reasons` gives); a shared synonym such as "tumour" is resolved by the diagnosis
or by the organ segment saved with it. The infer response's `segments`/`label_names` have the
same shape, so a client can send back what it received after editing. `validate` applies the
training rules at save time; errors name the key to fix.
"""

from dataclasses import dataclass, field

from raddiagseg import templates, vocabulary
from raddiagseg.answers import parse_answer

from lib import segments as segment_specs
from lib.infer_params import MODALITIES


class LabelInfoError(ValueError):
    pass


@dataclass
class LabelInfo:
    segments: list  # [(canonical name, label value, role)] of vocabulary targets, ordered by label value
    detection: bool | None
    diagnosis: str | None
    question: str
    slice: int | None
    modality: str | None
    unknown: list = field(default_factory=list)  # [(name as sent, label value)] not in the vocabulary


def _named_values(info):
    """[(name as sent, label value, role or None)] from `segments`, `label_names` or `label_info`."""
    raw = info.get("segments")
    if raw:
        if not isinstance(raw, list):
            raise LabelInfoError("segments must be a list of {name, label_value}")
        try:
            return [(str(item["name"]), int(item["label_value"]), item.get("role")) for item in raw]
        except (KeyError, TypeError, ValueError):
            raise LabelInfoError("each segment needs a name and an integer label_value") from None
    if isinstance(info.get("label_names"), dict):
        try:
            return [(str(k), int(v), None) for k, v in info["label_names"].items() if str(k).lower() != "background"]
        except (TypeError, ValueError):
            raise LabelInfoError("label_names must map names to integer label values") from None
    raw = info.get("label_info")
    if raw:
        if not isinstance(raw, list) or not all(isinstance(item, dict) and isinstance(item.get("name"), str)
                                                for item in raw):
            raise LabelInfoError('label_info must be a list of {"name": text, "idx": label value}')
        try:
            return [(item["name"], int(item.get("idx", position + 1)), None) for position, item in enumerate(raw)]
        except (TypeError, ValueError):
            raise LabelInfoError("label_info: each idx must be an integer label value") from None
    return []


def _diagnosis_of(abnormalities):
    """The one vocabulary diagnosis whose abnormality mask is among `abnormalities`, or None."""
    labels = {d["label"] for d in vocabulary.load()["diagnoses"] if d.get("abnormality") in abnormalities}
    return labels.pop() if len(labels) == 1 else None


def _resolve(name, diagnosis, organs):
    """Canonical vocabulary target for a name, or None; a shared synonym is resolved by the diagnosis or an organ."""
    canonical = segment_specs.canonical_name(name, diagnosis)
    if canonical in vocabulary.targets():
        return canonical
    candidates = {d["abnormality"] for d in vocabulary.load()["diagnoses"]
                  if d.get("abnormality") and d.get("organ") in organs and vocabulary.matches_target(name, d["abnormality"])}
    return candidates.pop() if len(candidates) == 1 else None


def parse(info):
    """LabelInfo from the JSON dict stored with a label; LabelInfoError names the key to fix."""
    if not isinstance(info, dict):
        raise LabelInfoError("label info must be a JSON object")
    pairs = sorted(_named_values(info), key=lambda p: p[1])
    if any(not 1 <= value <= 255 for _, value, _ in pairs):
        raise LabelInfoError("label values must be between 1 and 255")
    values = [value for _, value, _ in pairs]
    if len(set(values)) != len(values):
        raise LabelInfoError("each label value may be named once")

    answer = info.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise LabelInfoError("answer must be text")
    parsed = parse_answer(answer) if answer and answer.strip() else None
    detection = info.get("detection", parsed.detection if parsed else None)
    if detection is not None and not isinstance(detection, bool):
        raise LabelInfoError("detection must be true, false or null")
    diagnosis = info.get("diagnosis", parsed.diagnosis if parsed else None)
    if diagnosis is not None and not isinstance(diagnosis, str):
        raise LabelInfoError("diagnosis must be text or null")
    diagnosis = diagnosis.strip() if diagnosis and diagnosis.strip() else None
    question = info.get("question")
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise LabelInfoError("question must be non-empty text (or absent for the 3-step question)")
    modality = info.get("modality")
    if modality is not None and modality not in MODALITIES:
        raise LabelInfoError(f"modality must be one of {', '.join(MODALITIES)} (or absent)")
    slice_index = info.get("slice")
    if slice_index is not None and (isinstance(slice_index, bool) or not isinstance(slice_index, int) or slice_index < 0):
        raise LabelInfoError("slice must be a non-negative integer or null")

    organs = {vocabulary.canonical_target(name) for name, _, _ in pairs} - {None}
    segments, unknown = [], []
    for name, value, role in pairs:
        canonical = _resolve(name, diagnosis, organs)
        if canonical is None:
            unknown.append((name, value))
        else:
            segments.append((canonical, value, role or vocabulary.targets()[canonical]["role"]))
    names = [name for name, _, _ in segments]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise LabelInfoError(f"several label values name the same target ({', '.join(twice)}): use one value per target")
    if diagnosis is None and answer is None and detection is not False:
        diagnosis = _diagnosis_of({name for name, _, role in segments if role == "abnormality"})
    return LabelInfo(
        segments=segments,
        detection=detection,
        diagnosis=diagnosis,
        question=question or templates.DEFAULT_QUESTION,
        slice=slice_index,
        modality=modality,
        unknown=unknown,
    )


def unknown_reasons(info):
    """[{"segment", "label_value", "reason"}] for the names of a parsed LabelInfo that training leaves out."""
    known = ", ".join(segment_specs.label_names())
    return [{"segment": name, "label_value": value,
             "reason": f"{name!r} is not a target RadDiag knows (use one of {known} or a synonym); "
                       "its voxels are not trained on"}
            for name, value in info.unknown]


def validate(info):
    """Check label info when it is saved, with the rules training applies.

    Raises LabelInfoError (what to fix) for info training could not use; returns the reasons of
    segments that will be left out of training (unknown names), for the client to show."""
    return [entry["reason"] for entry in unknown_reasons(parse(info))]
