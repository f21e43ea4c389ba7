"""Segment specs: what the module needs to create one Slicer segment per returned target.

The server's JSON says, per target, its name, role (organ | abnormality), label value in the
returned label file, colour and terminology. This module turns that into `SegmentSpec`s with
Slicer-ready values (terminology entry string, colour in 0..1) and fixes the order in which
segments are exported for a correction (organs first, so abnormalities win on overlap).
"""

import functools
import json
import os

STANDARD_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
TERMINOLOGY_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "Resources", "Terminology", "RadDiag.term.json")

ROLE_ORDER = {"organ": 0, "abnormality": 1}

# Colours for targets the server sent without one (RGB 0-255, distinct from the vocabulary's).
FALLBACK_COLORS = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210),
                   (216, 101, 79), (221, 130, 101), (144, 238, 144), (192, 104, 88)]


class SegmentSpec:
    """One segment to create: `label_value` is its value in the returned label file."""

    __slots__ = ("name", "role", "label_value", "color", "terminology")

    def __init__(self, name, label_value, role="", color=(128, 128, 128), terminology=""):
        self.name = name
        self.label_value = int(label_value)
        self.role = role or ""
        self.color = tuple(int(c) for c in color)
        self.terminology = terminology or ""

    @property
    def color_float(self):
        """Colour as Slicer's segment.SetColor expects it (0..1)."""
        return tuple(c / 255.0 for c in self.color)

    def to_dict(self):
        return {"name": self.name, "role": self.role, "label_value": self.label_value,
                "color": list(self.color), "terminology": self.terminology}

    def __eq__(self, other):
        return isinstance(other, SegmentSpec) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"SegmentSpec({self.name!r}, label_value={self.label_value}, role={self.role!r})"


@functools.lru_cache(maxsize=1)
def custom_type_codes():
    """(scheme, code) of every type our .term.json defines: codes Slicer's own lists lack."""
    with open(TERMINOLOGY_FILE, encoding="utf-8") as f:
        content = json.load(f)
    codes = set()
    for category in content["SegmentationCodes"]["Category"]:
        for entry in category.get("Type", []):
            codes.add((entry["CodingSchemeDesignator"], entry["CodeValue"]))
    return frozenset(codes), content["SegmentationCategoryTypeContextName"]


def _code(value):
    if not value:
        return ["", "", ""]
    if isinstance(value, dict):
        value = [value.get("CodingSchemeDesignator", value.get("scheme", "")),
                 value.get("CodeValue", value.get("code", "")),
                 value.get("CodeMeaning", value.get("meaning", ""))]
    value = [str(v) for v in value]
    if len(value) != 3:
        raise ValueError(f"a terminology code needs (scheme, code, meaning), got {value!r}")
    return value


def terminology_string(terminology):
    """Slicer's terminology entry string (context~category~type~modifier~anatomic context~region~modifier).

    Accepts what the server may send: an entry string already, or a dict with `category` and
    `type` codes (lists or dicts) and optional `typeModifier`, `anatomicRegion`,
    `anatomicRegionModifier`. Types only our .term.json knows get its context name.
    """
    if not terminology:
        return ""
    if isinstance(terminology, dict) and "type" not in terminology and terminology.get("slicer"):
        terminology = terminology["slicer"]
    if isinstance(terminology, str):
        if terminology.count("~") < 2:
            raise ValueError(f"not a Slicer terminology entry string: {terminology!r}")
        return terminology
    category, type_ = _code(terminology.get("category")), _code(terminology.get("type"))
    custom, custom_context = custom_type_codes()
    context = terminology.get("contextName") or (
        custom_context if (type_[0], type_[1]) in custom else STANDARD_CONTEXT)
    region = _code(terminology.get("anatomicRegion"))
    anatomic_context = terminology.get("anatomicContextName") or ANATOMIC_CONTEXT
    parts = [context, "^".join(category), "^".join(type_), "^".join(_code(terminology.get("typeModifier"))),
             anatomic_context, "^".join(region), "^".join(_code(terminology.get("anatomicRegionModifier")))]
    return "~".join(parts)


def _color(value, index):
    if value is None or len(value) != 3:
        return FALLBACK_COLORS[index % len(FALLBACK_COLORS)]
    values = [float(v) for v in value]
    if all(0.0 <= v <= 1.0 for v in values) and any(v != int(v) for v in values):
        values = [v * 255.0 for v in values]  # 0..1 floats
    return tuple(max(0, min(255, int(round(v)))) for v in values)


def segment_specs(params):
    """SegmentSpecs from an /infer response's JSON, ordered by label value.

    Uses `segments` when present; otherwise falls back to `label_names` ({name: value}, what
    generic MONAI Label models send). Raises ValueError on inconsistent label values.
    """
    entries = params.get("segments")
    if entries is None:
        entries = [{"name": n, "label_value": v} for n, v in (params.get("label_names") or {}).items()
                   if n.lower() != "background" and int(v) > 0]
    specs, seen_values, seen_names = [], set(), {}
    for i, entry in enumerate(entries):
        name = str(entry.get("name") or f"segment {i + 1}").strip()
        value = entry.get("label_value", entry.get("value"))
        if value is None or int(value) <= 0:
            raise ValueError(f"segment '{name}' has no positive label value ({value!r})")
        if int(value) in seen_values:
            raise ValueError(f"label value {value} is used by two segments")
        seen_values.add(int(value))
        count = seen_names.get(name.lower(), 0)
        seen_names[name.lower()] = count + 1
        if count:
            name = f"{name} {count + 1}"  # Slicer allows equal names, users cannot tell them apart
        specs.append(SegmentSpec(name, int(value), entry.get("role", ""), _color(entry.get("color"), i),
                                 terminology_string(entry.get("terminology"))))
    return sorted(specs, key=lambda s: s.label_value)


def export_order(specs):
    """Specs in the order segments are exported for a correction: organs, abnormalities, others.

    Slicer's ExportSegmentsToLabelmapNode writes position+1 and later segments win on overlap,
    so a tumour inside its organ stays visible. Within a role the original label values decide.
    """
    return sorted(specs, key=lambda s: (ROLE_ORDER.get(s.role, 2), s.label_value))


def empty_segments(specs, present_values):
    """Specs whose label value has no voxel in the returned label map (to create as empty segments)."""
    present = {int(v) for v in present_values}
    return [s for s in specs if s.label_value not in present]


def import_segment_ids(specs):
    """Segment IDs for Slicer's ImportLabelmapToSegmentationNode, which maps label value i+1 to ids[i].

    Label values the specs do not name get placeholder IDs (`unnamed_<value>`) so the mapping
    stays aligned; the module removes such segments after import.
    """
    if not specs:
        return []
    by_value = {s.label_value: s.name for s in specs}
    return [by_value.get(v, f"unnamed_{v}") for v in range(1, max(by_value) + 1)]


def match_file_segments(file_specs, specs):
    """The response's spec for each segment of a `.seg.nrrd` result (by name, else by position; None if neither).

    A `.seg.nrrd`'s label values count within each layer (overlapping segments get layers of their
    own), so they cannot be compared with the response's label values.
    """
    by_name = {spec.name: spec for spec in specs}
    return [by_name.get(file_spec.name, specs[index] if index < len(specs) else None)
            for index, file_spec in enumerate(file_specs)]
