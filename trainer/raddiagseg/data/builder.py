"""Build RadDiagSeg-D: run every converter, check the rows, write `manifest.jsonl`.

Why one place: each source converter is independent, but the manifest must be one coherent
file (unique ids, one split per volume, paths relative to the manifest) and a bad source must
never stop the others. Output layout: `manifest.jsonl`, `images/<source>/…`, `masks/<source>/…`,
`build_report.json` (counts and the skipped files).
"""

import json
import logging
from collections import Counter
from pathlib import Path

from raddiagseg.data.covidqu import convert_covidqu
from raddiagseg.data.msd import MIN_ORGAN_PIXELS, convert_msd
from raddiagseg.data.records import BuildReport, reasonseg_rows, write_manifest
from raddiagseg.data.refseg_folders import convert_refseg
from raddiagseg.data.vqa_sets import convert_slake, convert_vqarad

log = logging.getLogger(__name__)


def build_dataset(out, msd=(), covidqu=None, vqarad=None, slake=None, refseg=None, seed=0,
                  min_organ_pixels=MIN_ORGAN_PIXELS, min_tumour_pixels=None, reasonseg=False):
    """Convert the given sources into `out`; returns (rows, BuildReport). Nothing is raised for bad files.

    reasonseg: also write `reasonseg` rows (implicit instructions, `records.reasonseg_rows`) for every
    segmented target that has implicit descriptions in the vocabulary.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = BuildReport()
    rows = []
    for task_dir in msd or ():
        rows += _guard(report, task_dir, convert_msd, task_dir, out, report, seed=seed,
                       min_organ_pixels=min_organ_pixels, min_tumour_pixels=min_tumour_pixels)
    if covidqu:
        rows += _guard(report, covidqu, convert_covidqu, covidqu, out, report)
    if vqarad:
        rows += _guard(report, vqarad, convert_vqarad, vqarad, out, report, seed=seed)
    if slake:
        rows += _guard(report, slake, convert_slake, slake, out, report)
    if refseg:
        rows += _guard(report, refseg, convert_refseg, refseg, out, report)
    if reasonseg:
        rows += reasonseg_rows(rows, seed)
    rows = _dedupe(rows, report)
    check_volume_splits(rows)
    if rows:
        write_manifest(out / "manifest.jsonl", rows)
    counts = Counter((r["task"], r["split"]) for r in rows)
    (out / "build_report.json").write_text(json.dumps({
        "rows": len(rows), "counts": {f"{t}/{s}": n for (t, s), n in sorted(counts.items())},
        "skipped": [{"path": p, "reason": r} for p, r in report.skipped]}, indent=1))
    return rows, report


def _guard(report, source, convert, *args, **kwargs):
    """Run one converter; an unexpected error skips that source with its message instead of aborting the build."""
    try:
        return convert(*args, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.skip(source, f"{type(exc).__name__}: {exc}")
        return []


def _dedupe(rows, report):
    seen, unique = set(), []
    for row in rows:
        if row["id"] in seen:
            report.skip(row["image"], f"duplicate sample id {row['id']}")
            continue
        seen.add(row["id"])
        unique.append(row)
    return unique


def check_volume_splits(rows):
    """Raise if any volume appears in two splits (a leak between training and evaluation)."""
    splits = {}
    for row in rows:
        if row.get("volume"):
            key = (row["source"], row["volume"])
            if splits.setdefault(key, row["split"]) != row["split"]:
                raise AssertionError(f"volume {key} appears in splits {splits[key]} and {row['split']}")


def build_phantom_dataset(out, ct_volumes=8, xrays=60, seed=0, ct_size=None, ct_slices=None, xray_size=256,
                          vqa_images=None, refseg_images=None, reasonseg=False, workers=None, variation="none"):
    """Phantom sources under `out/sources` built into `out` (manifest.jsonl); for the demo, tests and benchmarks.

    variation: `layouts.write_phantoms`'s ("none" = generator version 1, "scanner" = version 2, "mixed" = both).
    Returns the manifest path. Raises ValueError if nothing usable was built.
    """
    from raddiagseg.data.layouts import write_phantoms

    out = Path(out)
    paths = write_phantoms(out / "sources", ct_volumes, xrays, seed=seed, ct_size=ct_size, ct_slices=ct_slices,
                           xray_size=xray_size, vqa_images=vqa_images, refseg_images=refseg_images, workers=workers,
                           variation=variation)
    rows, report = build_dataset(out, msd=paths["msd"], covidqu=paths["covidqu"], vqarad=paths["vqarad"],
                                 slake=paths["slake"], refseg=paths["refseg"], seed=seed, reasonseg=reasonseg)
    if not rows:
        raise ValueError(f"no samples built from phantoms in {out}: {report.summary()}")
    return out / "manifest.jsonl"
