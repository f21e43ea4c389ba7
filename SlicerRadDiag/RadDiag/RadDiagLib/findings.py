"""The whole-volume findings as rows of the answer panel's table, and where each one lies.

The server measures every 3D finding (a lesion, or an organ with its volume) in the image file it read:
`{"name", "role", "organ", "label_value", "volume_ml", "max_diameter_mm", "slices": [first, last],
"centroid_lps_mm": [x, y, z], "score"}` (plus `index`/`count` when one target has several lesions).
That file is the module's export of the volume in its own (local) frame, so the centroid is in the volume's
local coordinates, in DICOM's LPS; Slicer's are RAS (x and y change sign). The module then maps the point
through the volume's parent transform to world coordinates before moving the slice views.
"""

FINDING_COLUMNS = ("Finding", "Volume (mL)", "Max diameter (mm)", "Slices")


def lps_to_ras(point):
    """RAS coordinates of an LPS point (the same point: x and y axes point the other way)."""
    x, y, z = (float(v) for v in point)
    return (-x, -y, z)


def _number(value, digits):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return f"{value:.{digits}f}"


def _slices(value):
    if isinstance(value, (list, tuple)) and len(value) == 2:
        first, last = value
        return str(first) if first == last else f"{first}–{last}"
    return "–"


def _title(finding):
    title = str(finding.get("name") or "finding")
    if isinstance(finding.get("count"), int) and finding["count"] > 1:
        title += f" {finding.get('index', '?')} of {finding['count']}"
    if finding.get("role") == "abnormality" and finding.get("organ"):
        title += f", in the {finding['organ']}"
    return title


class FindingRow:
    """One row of the findings table: its cells, the segment it belongs to, and its centroid in local RAS."""

    __slots__ = ("name", "role", "label_value", "cells", "centroid_ras")

    def __init__(self, finding):
        self.name = str(finding.get("name") or "")
        self.role = finding.get("role")
        self.label_value = finding.get("label_value")
        self.cells = (_title(finding), _number(finding.get("volume_ml"), 1),
                      _number(finding.get("max_diameter_mm"), 1), _slices(finding.get("slices")))
        centroid = finding.get("centroid_lps_mm")
        try:
            self.centroid_ras = lps_to_ras(centroid) if centroid is not None and len(centroid) == 3 else None
        except (TypeError, ValueError):  # a garbled centroid: listed, but the views cannot jump to it
            self.centroid_ras = None

    def __repr__(self):
        return f"FindingRow({self.cells!r}, centroid_ras={self.centroid_ras!r})"


def finding_rows(params):
    """Table rows for an /infer response's `findings` in the server's order (lesions first, then organs);
    [] for slice answers and for servers that send no findings."""
    found = (params or {}).get("findings")
    if not isinstance(found, list):
        return []
    return [FindingRow(f) for f in found if isinstance(f, dict)]
