"""Draw the module panel from RadDiag.ui with an example answer (a rendering, not a Slicer screenshot).

The Extensions Index wants a screenshot URL; without Slicer we draw the panel's sections and widget
texts from the .ui file, and the Answer section with the text RadDiagLib.answer_html makes and the
findings table's rows (RadDiagLib.finding_rows) for an example whole-volume answer.
Run: .venv/bin/python SlicerRadDiag/Screenshots/render_answer_panel.py
"""

import html
import re
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODULE = Path(__file__).resolve().parents[1] / "RadDiag"
sys.path.insert(0, str(MODULE))
from RadDiagLib import FINDING_COLUMNS, answer_html, finding_rows, segment_specs  # noqa: E402

EXAMPLE = {"answer": "1. Yes\n2. Liver tumour\n3. Segmentation masks:\n- liver <seg000>\n- liver tumour <seg001>",
           "detection": True, "diagnosis": "Liver tumour",
           "segments": [{"name": "liver", "role": "organ", "label_value": 1, "color": [221, 130, 101]},
                        {"name": "liver tumour", "role": "abnormality", "label_value": 2, "color": [240, 60, 60]}],
           "model": {"notice": "Answered by raddiagseg-demo: trained on synthetic phantoms only, not for clinical use"},
           "domain": {"in_domain": True, "score": 3.1, "threshold": 12.5, "reason": "within the training images"},
           "findings": [{"name": "liver tumour", "role": "abnormality", "organ": "liver", "label_value": 2,
                         "volume_ml": 2.4, "max_diameter_mm": 19.6, "slices": [5, 9],
                         "centroid_lps_mm": [-61.2, -20.4, 102.0], "score": 0.88},
                        {"name": "liver", "role": "organ", "organ": "liver", "label_value": 1, "volume_ml": 96.5,
                         "max_diameter_mm": 84.3, "slices": [2, 13], "centroid_lps_mm": [-55.0, -12.1, 99.0],
                         "score": 0.93}]}


def sections():
    """[(section title, [widget texts])] in the .ui's order."""
    root = ET.parse(MODULE / "Resources" / "UI" / "RadDiag.ui").getroot()
    found = []
    for button in root.iter("widget"):
        if button.get("class") != "ctkCollapsibleButton":
            continue
        title = button.find("property[@name='text']/string").text
        texts = [p.find("string").text for w in button.iter("widget") for p in w.findall("property[@name='text']")
                 if w is not button and p.find("string") is not None and p.find("string").text]
        found.append((title, texts))
    return found


def answer_lines():
    text = answer_html(EXAMPLE, segment_specs(EXAMPLE))
    text = re.sub(r"<br\s*/?>|</p>|</li>|</div>", "\n", text)
    lines = [html.unescape(line).strip() for line in re.sub(r"<[^>]+>", "", text).splitlines() if line.strip()]
    return [part for line in lines for part in textwrap.wrap(line, 72)]  # the panel's width


def findings_table():
    """The findings table as text lines: header, then one line per finding."""
    return [" | ".join(FINDING_COLUMNS), *(" | ".join(row.cells) for row in finding_rows(EXAMPLE))]


def main(out=Path(__file__).with_name("answer_panel.png")):
    rows = []
    for title, texts in sections():
        rows.append(("title", title))
        if title == "Answer":
            rows += [("answer", line) for line in answer_lines()] + [("table", line) for line in findings_table()]
        else:
            rows += [("text", t) for t in texts]
    fig = plt.figure(figsize=(5, 0.26 * (len(rows) + 3)), dpi=120)
    y = 1 - 0.5 / (len(rows) + 3)
    step = 1 / (len(rows) + 3)
    fig.text(0.03, y, "Rendering of RadDiag.ui with an example answer — not a Slicer screenshot", fontsize=7,
             style="italic", color="#666")
    for kind, text in rows:
        y -= step
        if kind == "title":
            fig.patches.append(plt.Rectangle((0.02, y - step * 0.4), 0.96, step * 0.85, transform=fig.transFigure,
                                             color="#dde3ea"))
            fig.text(0.04, y, "▾ " + text, fontsize=9, weight="bold", va="center")
        else:
            colour = "#c03030" if kind == "answer" and "tumour" in text.lower() else "#222"
            fig.text(0.08, y, text, fontsize=8, va="center", color=colour,
                     family="monospace" if kind == "table" else None)
    fig.savefig(out)
    return out


if __name__ == "__main__":
    print(main())
