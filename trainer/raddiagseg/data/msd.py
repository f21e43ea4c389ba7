"""Medical Segmentation Decathlon task folder → 2D CT slice rows (vqaseg + refseg).

Reads `dataset.json` (label names), `imagesTr/*.nii.gz` and `labelsTr/*.nii.gz`; reorients every
volume to LPS so slices look the same whatever the file's direction cosines; keeps only slices
where the organ is present (≥ `min_organ_pixels`). The organ mask includes the tumour (the
organ's full extent, as radiologists outline it). A slice is positive when its tumour covers at
least `min_tumour_pixels`; by default (None) max(20 px, 0.15 % of the slice) — about 100 px on a
256² slice, so that a positive stays visible (≥ ~5 px across) after the model's resize to 224-256 px; slices with a
smaller tumour fragment are left out of vqaseg (and of the tumour refseg) rather than
mislabeled as negative. Volumes never cross splits.
"""

import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from raddiagseg import imaging, vocabulary
from raddiagseg.data import io
from raddiagseg.data.records import assign_splits, diagnosis_for, refseg_row, vqaseg_row

log = logging.getLogger(__name__)

ABNORMALITY_WORDS = {"cancer", "tumour", "tumor", "tumours", "tumors", "lesion", "mass", "neoplasm"}
MIN_ORGAN_PIXELS = 100
MIN_TUMOUR_PIXELS = 20
MIN_TUMOUR_FRACTION = 0.0015  # of the slice area


def read_task(task_dir, report):
    """(organ, {label value: role}, [(image path, label path)]) from an MSD task folder, or None if unusable."""
    task_dir = Path(task_dir)
    meta_path = task_dir / "dataset.json"
    if not meta_path.is_file():
        report.skip(meta_path, "missing dataset.json (is this an MSD task folder?)")
        return None
    try:
        meta = json.loads(meta_path.read_text())
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
    except (json.JSONDecodeError, KeyError, ValueError, AttributeError) as exc:
        report.skip(meta_path, f"unreadable dataset.json: {exc}")
        return None
    organ, roles = None, {}
    for value, name in sorted(labels.items()):
        key = vocabulary.normalise_label(name)
        if value == 0 or key == "background":
            continue
        canonical = vocabulary.canonical_target(key)
        if canonical and vocabulary.targets()[canonical]["role"] == "organ" and organ in (None, canonical):
            organ, roles[value] = canonical, "organ"
        elif key in ABNORMALITY_WORDS or any(w in ABNORMALITY_WORDS for w in key.split()):
            roles[value] = "abnormality"
        else:
            report.skip(meta_path, f"unknown label {value}: {name!r} (ignored; voxels treated as background)")
    if organ is None:
        report.skip(meta_path, f"no known organ among labels {sorted(labels.values())}")
        return None
    pairs = []
    entries = meta.get("training")
    if not entries:
        entries = [{"image": f"./imagesTr/{p.name}", "label": f"./labelsTr/{p.name}"}
                   for p in sorted((task_dir / "imagesTr").glob("*.nii*")) if not p.name.startswith(".")]
    for entry in entries:
        try:
            pairs.append((task_dir / entry["image"], task_dir / entry["label"]))
        except (KeyError, TypeError):
            report.skip(meta_path, f"training entry without image/label: {entry!r}")
    return organ, roles, pairs


def volume_id(path):
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def convert_msd(task_dir, out, report, seed=0, min_organ_pixels=MIN_ORGAN_PIXELS, min_tumour_pixels=None):
    """Rows for one MSD task folder; image and mask files are written under `out`."""
    task = read_task(task_dir, report)
    if task is None:
        return []
    organ, roles, pairs = task
    abnormality = f"{organ} tumour" if "abnormality" in roles.values() and f"{organ} tumour" in vocabulary.targets() else None
    diagnosis = diagnosis_for(organ, abnormality) if abnormality else None
    source = f"msd_{organ}"
    organ_values = [v for v, r in roles.items() if r in ("organ", "abnormality")]
    abn_values = [v for v, r in roles.items() if r == "abnormality"]
    splits = assign_splits([volume_id(i) for i, _ in pairs], seed, source)
    rows = []
    for image_path, label_path in tqdm(pairs, desc=source, unit="vol", leave=False):
        rows += _convert_volume(image_path, label_path, out, report, source, organ, abnormality, diagnosis,
                                organ_values, abn_values, set(roles) | {0}, splits[volume_id(image_path)],
                                min_organ_pixels, min_tumour_pixels)
    return rows


def _convert_volume(image_path, label_path, out, report, source, organ, abnormality, diagnosis,
                    organ_values, abn_values, known_values, split, min_organ_pixels, min_tumour_pixels):
    for path in (image_path, label_path):
        if not Path(path).is_file():
            report.skip(path, "missing file")
            return []
    try:
        hu, affine = io.load_volume_lps(image_path)
        label, _ = io.load_volume_lps(label_path)
    except Exception as exc:  # nibabel/gzip errors on corrupt files
        report.skip(image_path, f"unreadable volume: {exc}")
        return []
    if hu.shape != label.shape:
        report.skip(label_path, f"label shape {label.shape} differs from image shape {hu.shape}")
        return []
    if hu.size == 0 or hu.shape[2] == 0 or float(hu.max()) == float(hu.min()):
        report.skip(image_path, "empty volume (no slices or constant intensity)")
        return []
    if not np.isfinite(hu).all():
        report.skip(image_path, "volume contains NaN or infinite values")
        return []
    label = np.rint(label).astype(np.int32)
    unknown = sorted(set(np.unique(label).tolist()) - known_values)
    if unknown:
        report.skip(label_path, f"label values {unknown} not in dataset.json (treated as background)")
    organ_mask = np.isin(label, organ_values)
    abn_mask = np.isin(label, abn_values)
    vol = volume_id(image_path)
    rows = []
    for k in range(hu.shape[2]):
        organ_slice = io.axial_slice(organ_mask, k)
        if organ_slice.sum() < min_organ_pixels:
            continue
        abn_slice = io.axial_slice(abn_mask, k)
        tumour_px = int(abn_slice.sum())
        stem = f"{vol}_s{k:03d}"
        slice_affine = io.axial_slice_affine(affine, k)
        image_rel = f"images/{source}/{stem}.nii.gz"
        io.write_nifti_slice(Path(out) / image_rel, io.axial_slice(hu, k).astype(np.int16), slice_affine)
        organ_target = {"name": organ, "role": "organ", "mask": f"masks/{source}/{stem}_{organ.replace(' ', '_')}.nii.gz"}
        io.write_nifti_slice(Path(out) / organ_target["mask"], organ_slice.astype(np.uint8), slice_affine)
        base = {"id": f"{source}_{stem}", "source": source, "modality": "ct", "split": split, "image": image_rel,
                "window": list(imaging.CT_WINDOW), "volume": vol, "slice": k}
        rows.append(refseg_row({**base, "id": f"{base['id']}_ref_{organ.replace(' ', '_')}"}, organ_target))
        threshold = (max(MIN_TUMOUR_PIXELS, MIN_TUMOUR_FRACTION * organ_slice.size)
                     if min_tumour_pixels is None else min_tumour_pixels)
        positive = abnormality is not None and tumour_px >= threshold
        if positive:
            abn_target = {"name": abnormality, "role": "abnormality",
                          "mask": f"masks/{source}/{stem}_{abnormality.replace(' ', '_')}.nii.gz"}
            io.write_nifti_slice(Path(out) / abn_target["mask"], abn_slice.astype(np.uint8), slice_affine)
            rows.append(refseg_row({**base, "id": f"{base['id']}_ref_{abnormality.replace(' ', '_')}"}, abn_target))
            rows.append(vqaseg_row(base, True, diagnosis, [organ_target, abn_target]))
        elif diagnosis is not None and tumour_px == 0:
            rows.append(vqaseg_row(base, False))
    return rows
