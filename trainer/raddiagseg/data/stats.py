"""Composition of a built dataset (paper 001 Figure 6): counts per task, modality, diagnosis and split,
and the positive/negative balance of VQA-Seg, as a text table and a PNG chart."""

from collections import Counter
from pathlib import Path

from raddiagseg.data.records import SPLITS, read_manifest


def dataset_stats(rows):
    """Counts as nested plain dicts (JSON-ready)."""
    def label(row):
        if row["task"] != "vqaseg":
            return None
        return row["diagnosis"] if row.get("detection") else "negative"

    by = {
        "task": Counter(r["task"] for r in rows),
        "modality": Counter(f"{r['task']}/{r['modality']}" for r in rows),
        "split": Counter(f"{r['task']}/{r['split']}" for r in rows),
        "diagnosis": Counter(f"{r['split']}/{label(r)}" for r in rows if label(r)),
        "vqaseg_balance": Counter(f"{r['modality']}/{'positive' if r.get('detection') else 'negative'}"
                                  for r in rows if r["task"] == "vqaseg"),
        "vqa_answer_type": Counter(f"{r['split']}/{r.get('answer_type')}" for r in rows if r["task"] == "vqa"),
        "source": Counter(r["source"] for r in rows),
    }
    return {"total": len(rows), **{k: dict(sorted(v.items())) for k, v in by.items()}}


def format_table(stats):
    lines = [f"samples: {stats['total']}"]
    for section in ("task", "source", "modality", "split", "diagnosis", "vqaseg_balance", "vqa_answer_type"):
        if not stats[section]:
            continue
        lines.append(f"\n{section}")
        width = max(len(k) for k in stats[section])
        lines += [f"  {k:<{width}}  {v:>7d}" for k, v in stats[section].items()]
    return "\n".join(lines)


def plot_stats(rows, path):
    """Bar charts: VQA-Seg diagnoses (positives by diagnosis + negatives) per split, per modality, and tasks per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    vqaseg = [r for r in rows if r["task"] == "vqaseg"]
    labels = sorted({(r["modality"], r["diagnosis"] if r.get("detection") else "negative") for r in vqaseg})
    x = range(len(labels))
    for offset, split in enumerate(SPLITS):
        counts = Counter((r["modality"], r["diagnosis"] if r.get("detection") else "negative") for r in vqaseg if r["split"] == split)
        axes[0].bar([i + (offset - 1) * 0.27 for i in x], [counts[lab] for lab in labels], width=0.27, label=split)
    axes[0].set_xticks(list(x), [f"{m}: {d}" for m, d in labels], rotation=25, ha="right", fontsize=8)
    axes[0].set_title("VQA-Seg samples by diagnosis (negatives = no abnormality)")
    axes[0].legend()
    tasks = sorted({r["task"] for r in rows})
    for offset, split in enumerate(SPLITS):
        counts = Counter(r["task"] for r in rows if r["split"] == split)
        axes[1].bar([i + (offset - 1) * 0.27 for i in range(len(tasks))], [counts[t] for t in tasks], width=0.27, label=split)
    axes[1].set_xticks(range(len(tasks)), tasks)
    axes[1].set_title("Samples per task and split")
    axes[1].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def stats_for(directory):
    rows = read_manifest(directory)
    return rows, dataset_stats(rows)
