"""Writing a benchmark report: JSON, a markdown table shaped like paper 001 Table 3, the per-sample CSV and a Dice box plot."""

import csv
import json
from pathlib import Path

from raddiagseg.fileio import atomic_write

MODALITY_TITLES = {"xray": "X-ray", "ct": "CT", "mri": "MRI"}
MODALITY_ORDER = ("xray", "ct", "mri")
TABLE3_COLUMNS = (("Detection F1", "detection_f1"), ("Diagnosis F1", "diagnosis_f1"), ("Dice-Org", "dice_org"), ("Dice-Abn", "dice_abn"))
CSV_COLUMNS = (
    "id", "task", "modality", "source", "gt_detection", "pred_detection", "detection_correct", "gt_diagnosis",
    "pred_diagnosis", "c", "dice_org", "dice_abn", "refseg_dice", "dice_per_target", "iou", "answer_type", "vqa_recall", "vqa_f1",
    "closed_correct", "notes", "answer",
)


def write_json(report, path):
    atomic_write(path, json.dumps(report, indent=2) + "\n")


def _modalities(report):
    present = [m for m in report if m != "overall"]
    return [m for m in MODALITY_ORDER if m in present] + sorted(m for m in present if m not in MODALITY_ORDER)


def _fmt(value):
    return "–" if value is None else f"{value:.3f}"


def _scored_modalities(report):
    return [m for m in _modalities(report) if report[m].get("n")] or _modalities(report)


def table3(entries):
    """Markdown lines of paper 001 Table 3 for [(model name, report)]: one row per model, '–' where a model has no value."""
    mods = []
    for _, report in entries:
        mods += [m for m in _scored_modalities(report) if m not in mods]
    mods = [m for m in MODALITY_ORDER if m in mods] + [m for m in mods if m not in MODALITY_ORDER]
    header = ["Model"] + [f"{MODALITY_TITLES.get(m, m)} {title}" for m in mods for title, _ in TABLE3_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    any_amputated = False
    for name, report in entries:
        amputated = bool(report["overall"].get("amputated"))
        any_amputated |= amputated
        cells = [f"{name}\\*" if amputated else name]
        cells += [_fmt(report.get(m, {}).get(key)) for m in mods for _, key in TABLE3_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if any_amputated:
        lines += ["", "\\*Amputated: detection, diagnosis and diagnosis + segmentation asked as separate questions."]
    return lines


def markdown(report, name="model"):
    """Table 3 layout (per modality: Detection F1, Diagnosis F1, Dice-Org, Dice-Abn), then counts and the other metrics."""
    mods = _scored_modalities(report)
    lines = ["## RadDiagSeg-D", ""] + table3([(name, report)])
    lines += ["", "Samples: " + "; ".join(
        f"{MODALITY_TITLES.get(m, m)} n = {report[m]['n']} ({report[m].get('n_positive', 0)} positive, "
        f"{report[m].get('n_unreadable', 0)} unreadable step 1), Dice over {report[m]['n_dice_org']} organ / "
        f"{report[m]['n_dice_abn']} abnormality masks"
        for m in mods
    ) + "."]
    overall = report["overall"]
    lines += ["", f"Diagnosis rule: {overall.get('diagnosis_rule')}; amputated questions: {overall.get('amputated')}; "
              f"predictions missing: {overall.get('n_missing', 0)}."]
    rows = [("all", overall)] + [(MODALITY_TITLES.get(m, m), report[m]) for m in _modalities(report)]
    lines += ["", "## All metrics", "",
              "| Group | Det. P | Det. R | Det. F1 | Diag. F1 | Diag. Acc | Dice-Org | Dice-Abn | gIoU | cIoU | Ref-Seg Dice (n) "
              "| VQA F1 | VQA Recall | Closed F1 | Closed Recall | Closed Acc | OpenQ-Acc | OpenQ-Recall |",
              "|" + "---|" * 18]
    for label, g in rows:
        cells = [label] + [_fmt(g.get(k)) for k in ("detection_precision", "detection_recall", "detection_f1",
                                                      "diagnosis_f1", "diagnosis_acc", "dice_org", "dice_abn", "giou", "ciou")]
        cells.append(f"{_fmt(g.get('refseg_dice'))} ({g.get('n_refseg', 0)})")
        cells += [_fmt(g.get(k)) for k in ("vqa_f1", "vqa_recall", "vqa_closed_f1", "vqa_closed_recall",
                                           "vqa_closed_acc", "vqa_open_acc", "vqa_open_recall")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paper 003's accuracy is Diag. Acc (mean of c); gIoU and cIoU cover every GT mask of GT-positive "
              "3-step samples and Ref-Seg samples, whatever the text answer."]
    if overall.get("n_reasonseg"):
        lines += ["", "## Reasoning segmentation", "", "| Subset | n | gIoU | cIoU | Accuracy |", "|---|---|---|---|---|"]
        groups = [("all", overall)] + sorted((overall.get("reasonseg_subsets") or {}).items())
        for label, g in groups:
            cells = [label, str(g["n_reasonseg"])] + [_fmt(g.get(k)) for k in ("reasonseg_giou", "reasonseg_ciou", "reasonseg_acc")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Accuracy: the answer resolved the implicit instruction to the right target (its mask label names it)."]
    return "\n".join(lines) + "\n"


def write_markdown(report, path, name="model"):
    atomic_write(path, markdown(report, name))


def update_comparison(path, name, report):
    """Add (or replace) model `name` in a comparison table: PATH.md (Table 3, one row per model) + PATH.json (the reports)."""
    path = Path(path)
    store = path.with_suffix(".json")
    entries = json.loads(store.read_text()) if store.exists() else {}
    if not isinstance(entries, dict):
        raise ValueError(f"{store} is not a comparison table store (expected a JSON object name -> report)")
    entries[name] = report
    atomic_write(store, json.dumps(entries, indent=2) + "\n")
    atomic_write(path, "\n".join(["## RadDiagSeg-D", ""] + table3(list(entries.items()))) + "\n")
    return path


def _role_mean(record, role):
    values = [d for (_, r, d) in record.get("dice", []) if r == role]
    return sum(values) / len(values) if values else None


def csv_rows(records):
    for r in records:
        overlaps = r.get("overlaps") or []
        ious = [(o[0] / (o[1] + o[2] - o[0]) if o[1] + o[2] - o[0] else 1.0) for o in overlaps]
        row = {key: r.get(key) for key in CSV_COLUMNS}
        row["dice_org"] = _role_mean(r, "organ")
        row["dice_abn"] = _role_mean(r, "abnormality")
        row["refseg_dice"] = _role_mean(r, "refseg")
        row["dice_per_target"] = "; ".join(f"{name}={d:.4f}" for name, _, d in r.get("dice", []))
        row["iou"] = "; ".join(f"{v:.4f}" for v in ious)
        row["notes"] = " | ".join(r.get("notes", []))
        yield row


def write_csv(records, path):
    """One row per scored sample with every parse and scoring decision in `notes`."""
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in csv_rows(records):
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write(path, buffer.getvalue())


def dice_groups(records):
    """{"CT Org": [per-sample Dice], "CT Abn": [...], "CT Ref-Seg": [...], ...} for the box plot."""
    groups = {}
    order = {m: i for i, m in enumerate(MODALITY_ORDER)}
    for r in sorted(records, key=lambda r: order.get(r["modality"], 99)):
        title = MODALITY_TITLES.get(r["modality"], r["modality"])
        if r["task"] == "vqaseg":
            for role, short in (("organ", "Org"), ("abnormality", "Abn")):
                value = _role_mean(r, role)
                if value is not None:
                    groups.setdefault(f"{title} {short}", []).append(value)
        elif r["task"] == "refseg" and r.get("dice"):
            groups.setdefault(f"{title} Ref-Seg", []).append(r["dice"][0][2])
    return groups


def plot_dice(records, path, name="model"):
    """Box plot of per-sample Dice per modality and role (paper 001 Figure 5). Returns False when there is nothing to plot."""
    groups = dice_groups(records)
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) + 1.5), 4.0))
    labels = list(groups)
    ax.boxplot([groups[k] for k in labels], showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), [f"{k}\n(n={len(groups[k])})" for k in labels])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice per sample")
    ax.set_title(f"{name}: Dice per modality and role")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_all(report, records, json_path, md_path=None, name="model"):
    """report.json + report.md (optional) + report.csv and report_dice.png next to the JSON. Returns the paths written."""
    json_path = Path(json_path)
    write_json(report, json_path)
    written = [json_path]
    if md_path:
        write_markdown(report, md_path, name)
        written.append(Path(md_path))
    csv_path = json_path.with_suffix(".csv")
    write_csv(records, csv_path)
    written.append(csv_path)
    png_path = json_path.with_name(json_path.stem + "_dice.png")
    if plot_dice(records, png_path, name):
        written.append(png_path)
    return written
