"""From the label texts a model writes before its seg tokens to named, coloured, coded segments.

The vocabulary (`raddiagseg/resources/vocabulary.json`) is the single source of names, roles,
colours and SNOMED CT / DICOM codes, so the app, the trainer and the Slicer extension agree.
"""

from slicerio.segmentation import terminology_entry_to_string
from raddiagseg import vocabulary
from raddiagseg.findings import canonical_name, diagnosis_entry  # noqa: F401  (names of model text, for the app)

TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
FALLBACK_COLORS = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79)]


def label_names():
    """Every canonical target name the model can emit, in vocabulary order."""
    return [t["name"] for t in vocabulary.load()["targets"]]


def terminology(name):
    """Coded terminology of a target: {category, type, slicer} (slicer = Slicer's TerminologyEntry string), or None."""
    entry = vocabulary.targets().get(name)
    if not entry or "terminology" not in entry:
        return None
    coded = {"contextName": TERMINOLOGY_CONTEXT, **entry["terminology"]}
    return {
        "category": list(entry["terminology"]["category"]),
        "type": list(entry["terminology"]["type"]),
        "slicer": terminology_entry_to_string(coded),
    }


def describe(name, label_value):
    """JSON description of one output segment."""
    entry = vocabulary.targets().get(name)
    color = entry["color"] if entry else FALLBACK_COLORS[(label_value - 1) % len(FALLBACK_COLORS)]
    return {
        "name": name,
        "role": entry["role"] if entry else "unknown",
        "label_value": label_value,
        "color": [int(c) for c in color],
        "terminology": terminology(name),
    }


def assign(names_in_order):
    """Segment descriptions with contiguous label values 1..N in order of first appearance."""
    unique = list(dict.fromkeys(names_in_order))
    return [describe(name, i + 1) for i, name in enumerate(unique)]


def paint_order(segments):
    """Segments ordered so abnormalities are painted after (on top of) the organs that contain them."""
    rank = {"organ": 0, "unknown": 1, "abnormality": 2}
    return sorted(segments, key=lambda s: (rank.get(s["role"], 1), s["label_value"]))
