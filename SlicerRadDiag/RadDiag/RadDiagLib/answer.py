"""The answer panel's HTML: the model's text escaped, detection and diagnosis highlighted.

Model output is untrusted text; it is always HTML-escaped before any markup is added. Seg
tokens become the name of the segment they produced, in its colour. Every answer says which
model gave it (the response's `model`) and how the image was read (`modality`), and an image outside
the model's domain (`domain`) is flagged above everything else. Servers that send neither key are still displayed.
"""

import html
import re

SEG_TOKEN_RE = re.compile(r"&lt;seg(\d{3})&gt;")
POSITIVE = "#c0392b"
NEGATIVE = "#1e8449"
WARNING = "#fde2c4"
MAX_SLICE_ROWS = 40


def _token_chip(index, specs):
    # seg token i is the i-th target of the answer = the segment with label value i+1 (server contract)
    spec = next((s for s in specs if s.label_value == index + 1), None)
    if spec is None:
        return f"&lt;seg{index:03d}&gt;"
    r, g, b = spec.color
    return (f'<span style="background-color:rgb({r},{g},{b}); color:black; padding:0 3px;">'
            f"&#9632; {html.escape(spec.name)}</span>")


def _detection_text(detection):
    if detection is True:
        return f'<b style="color:{POSITIVE}">Abnormality detected</b>'
    if detection is False:
        return f'<b style="color:{NEGATIVE}">No abnormality detected</b>'
    return "<b>Detection: not stated</b>"


def answer_lines_html(answer, specs=()):
    """Escaped answer with step 1 (detection) and step 2 (diagnosis) lines highlighted."""
    out = []
    for line in (answer or "").splitlines():
        text = html.escape(line)
        text = SEG_TOKEN_RE.sub(lambda m: _token_chip(int(m.group(1)), specs), text)
        stripped = line.strip()
        if stripped.startswith("1."):
            colour = POSITIVE if "yes" in stripped.lower() else NEGATIVE
            text = f'<span style="color:{colour}; font-weight:bold">{text}</span>'
        elif stripped.startswith("2."):
            text = f'<span style="background-color:#fff3b0; font-weight:bold">{text}</span>'
        out.append(text)
    return "<br>".join(out)


def _slice_rows(slices):
    if isinstance(slices, dict):
        for key in ("per_slice", "slices", "items"):
            if isinstance(slices.get(key), list):
                return slices[key], slices.get("summary")
        rows = [dict(v, slice=k) if isinstance(v, dict) else {"slice": k, "answer": v} for k, v in slices.items()
                if k != "summary"]
        return rows, slices.get("summary")
    return list(slices or []), None


def model_notice(params):
    """Which model answered and what it may be used for, e.g. "Answered by raddiagseg-demo: trained on
    synthetic phantoms only, not for clinical use"; "" when the server does not say."""
    model = params.get("model")
    if not isinstance(model, dict):
        return f"Answered by {model}." if isinstance(model, str) and model else ""
    if model.get("notice"):
        return str(model["notice"])
    if not model.get("name"):
        version = model.get("version")
        return (f"Answered by model version {version}; the server does not say what it was trained on."
                if version else "")
    text = f"Answered by {model['name']}"
    if model.get("trained_on"):
        text += f": trained on {model['trained_on']}"
    if model.get("clinical_use") is False:
        text += ", not for clinical use"
    return text + "."


MODALITY_TITLES = {"ct": "CT", "xray": "X-ray", "mri": "MR"}  # any other: its DICOM code (US, NM, OT, ...)
MODALITY_SOURCES = {"param": "as requested", "dicom": "from the DICOM header", "intensities": "from its intensities"}


def modality_line(params):
    """How the server read the image, e.g. "Read as US (from the DICOM header)."; "" when it does not say."""
    modality = params.get("modality")
    if not isinstance(modality, dict) or not modality.get("value"):
        return ""
    value = str(modality["value"])
    source = MODALITY_SOURCES.get(modality.get("source"), "")
    return f"Read as {MODALITY_TITLES.get(value, value.upper())}" + (f" ({source})." if source else ".")


def domain_warning(params):
    """Why the image is outside the model's domain and what that did to the answer; "" when it is inside
    (or the server has no domain check)."""
    domain = params.get("domain")
    if not isinstance(domain, dict) or domain.get("in_domain") is not False:
        return ""
    text = "This image is outside what the model was trained on"
    if domain.get("reason"):
        text += f": {str(domain['reason']).rstrip('.')}"
    score, threshold = domain.get("score"), domain.get("threshold")
    if isinstance(score, (int, float)) and isinstance(threshold, (int, float)):
        text += f" (domain score {score:.3g}, threshold {threshold:.3g})"
    if params.get("detection") is None and not params.get("diagnosis"):
        return text + ". No diagnosis was given. To answer anyway, tick \"Answer anyway\" in Options and ask again."
    return text + ". Answered anyway on request: do not rely on this answer."


def answer_html(params, specs=()):
    """Full answer panel for an /infer response: domain warning, model notice, summary, highlighted answer,
    per-slice table."""
    parts = []
    warning = domain_warning(params)
    if warning:
        parts.append(f'<p style="background-color:{WARNING}; color:black"><b>Warning:</b> {html.escape(warning)}</p>')
    notice = " ".join(t.rstrip(".") + "." for t in (model_notice(params), modality_line(params)) if t)
    if notice:
        parts.append(f"<i>{html.escape(notice)}</i>")
    no_answer = warning and params.get("detection") is None
    parts.append("<b>No diagnosis given</b>" if no_answer else _detection_text(params.get("detection")))
    if params.get("diagnosis"):
        parts.append(f'Diagnosis: <b style="background-color:#fff3b0">{html.escape(str(params["diagnosis"]))}</b>')
    parts.append("<hr>" + (answer_lines_html(params.get("answer", ""), specs) or "<i>(empty answer)</i>"))
    agreement = params.get("agreement")
    if isinstance(agreement, dict) and agreement.get("paths"):  # test-time scaling
        masks = agreement.get("masks") or []
        line = (f"Test-time scaling: {int(agreement['paths'])} answers, {agreement.get('answer', 0):.0%} agree"
                + (f"; mask agreement (IoU) {', '.join(f'{m:.2f}' for m in masks)}" if masks else ""))
        if agreement.get("uncertainty") is not None:
            line += f"; uncertainty {agreement['uncertainty']:.2f}"
        parts.append(f"<i>{html.escape(line)}</i>")
    if params.get("reasoning"):  # chain of thought
        parts.append("<i>Reasoning:</i> " + html.escape(str(params["reasoning"])).replace("\n", "<br>"))
    rows, summary = _slice_rows(params.get("slices"))
    if summary and isinstance(summary, str):
        parts.append(f"<p><i>{html.escape(summary)}</i></p>")
    volume = params.get("volume")
    if isinstance(volume, dict) and volume.get("n_slices"):
        positives = volume.get("positive_slices") or []
        parts.append(f"Abnormal on {len(positives)} of {int(volume['n_slices'])} slices"
                     + (": " + html.escape(", ".join(str(p) for p in positives[:50])) if positives else "")
                     + (" …" if len(positives) > 50 else ""))
    hidden = 0
    if len(rows) > MAX_SLICE_ROWS:  # long volumes: list the slices that say something
        kept = [r for r in rows if not isinstance(r, dict) or r.get("detection") is not False]
        hidden = len(rows) - len(kept)
        rows = kept[:MAX_SLICE_ROWS]
    if rows:
        table = ['<table border="1" cellspacing="0" cellpadding="2"><tr><th>Slice</th><th>Answer</th></tr>']
        for row in rows:
            if not isinstance(row, dict):
                continue
            index = row.get("slice", row.get("index", "?"))
            answer = answer_lines_html(row.get("answer", ""), specs)
            table.append(f"<tr><td>{html.escape(str(index))}</td><td>{answer}</td></tr>")
        table.append("</table>")
        if hidden:
            table.append(f"<i>{hidden} other slices: no abnormality.</i>")
        parts.append("Per-slice answers:" + "".join(table))
    return "<br>".join(parts)
