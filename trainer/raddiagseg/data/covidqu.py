"""COVID-QU-Ex 'Infection Segmentation Data' tree → chest X-ray rows (vqaseg + refseg).

Layout: `<split>/<class>/{images,lung masks,infection masks}/<name>.png` with split Train/Val/Test
and class COVID-19 / Non-COVID / Normal (the dataset's own splits are kept). COVID-19 images
are positives with lung + infection masks; Non-COVID images are positives with the lung mask
only (the release has no infection masks for them, paper 001 Fig. 10); Normal images are
negatives.
"""

import logging
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from raddiagseg.data import io
from raddiagseg.data.records import diagnosis_for, refseg_row, vqaseg_row

log = logging.getLogger(__name__)

SOURCE = "covidqu"
SPLITS = {"Train": "train", "Val": "val", "Test": "test"}
CLASSES = {"COVID-19": "covid", "Non-COVID": "noncovid", "Normal": "normal"}
INNER = ("Infection Segmentation Data", "Infection Segmentation Data")


def find_root(directory):
    """The folder holding Train/Val/Test: DIR itself, or DIR/Infection Segmentation Data[/Infection Segmentation Data]."""
    directory = Path(directory)
    for candidate in (directory, directory / INNER[0], directory / INNER[0] / INNER[1]):
        if any((candidate / s).is_dir() for s in SPLITS):
            return candidate
    return None


def safe_stem(name):
    """`non_COVID (12).png` → `non_covid_12`: ids and file names without spaces or brackets."""
    return re.sub(r"[^a-z0-9]+", "_", Path(name).stem.lower()).strip("_")


def _read_mask(path, shape, report):
    if not path.is_file():
        report.skip(path, "missing mask")
        return None
    try:
        mask = io.read_slice(path)
    except ValueError as exc:
        report.skip(path, str(exc))
        return None
    if mask.shape != shape:
        report.skip(path, f"mask shape {mask.shape} differs from image shape {shape}")
        return None
    return (mask > 127).astype(np.uint8)


def convert_covidqu(directory, out, report):
    """Rows for a COVID-QU-Ex tree; images (8-bit PNG) and 0/1 PNG masks are written under `out`."""
    root = find_root(directory)
    if root is None:
        report.skip(directory, "no Train/Val/Test folders (expected the COVID-QU-Ex 'Infection Segmentation Data' tree)")
        return []
    items = []
    for split_dir, split in SPLITS.items():
        for class_dir, short in CLASSES.items():
            images = root / split_dir / class_dir / "images"
            if images.is_dir():
                items += [(split, class_dir, short, p) for p in sorted(images.iterdir())
                          if p.suffix.lower() in (".png", ".jpg", ".jpeg") and not p.name.startswith(".")]
    if not items:
        report.skip(root, "no images found under <split>/<class>/images/")
        return []
    covid_dx = diagnosis_for("lung", "infection")
    noncovid_dx = diagnosis_for("lung", None)
    rows = []
    for split, class_dir, short, path in tqdm(items, desc=SOURCE, unit="img", leave=False):
        try:
            image = io.read_slice(path)
        except ValueError as exc:
            report.skip(path, str(exc))
            continue
        folder = path.parent.parent
        lung = _read_mask(folder / "lung masks" / path.name, image.shape, report)
        if lung is None:
            continue
        if not lung.any():
            report.skip(folder / "lung masks" / path.name, "empty lung mask")
            continue
        infection = None
        if class_dir == "COVID-19":
            infection = _read_mask(folder / "infection masks" / path.name, image.shape, report)
            if infection is None:
                continue
            if not infection.any():
                report.skip(folder / "infection masks" / path.name, "COVID-19 image with an empty infection mask")
                continue
        stem = f"{short}_{split}_{safe_stem(path.name)}"
        image_rel = f"images/{SOURCE}/{stem}.png"
        io.write_png(Path(out) / image_rel, image)
        lung_target = {"name": "lung", "role": "organ", "mask": f"masks/{SOURCE}/{stem}_lung.png"}
        io.write_png(Path(out) / lung_target["mask"], lung)
        base = {"id": f"{SOURCE}_{stem}", "source": SOURCE, "modality": "xray", "split": split,
                "image": image_rel, "window": None, "volume": None, "slice": None}
        rows.append(refseg_row({**base, "id": f"{base['id']}_ref_lung"}, lung_target))
        if class_dir == "COVID-19":
            inf_target = {"name": "infection", "role": "abnormality", "mask": f"masks/{SOURCE}/{stem}_infection.png"}
            io.write_png(Path(out) / inf_target["mask"], infection)
            rows.append(refseg_row({**base, "id": f"{base['id']}_ref_infection"}, inf_target))
            rows.append(vqaseg_row(base, True, covid_dx, [lung_target, inf_target]))
        elif class_dir == "Non-COVID":
            rows.append(vqaseg_row(base, True, noncovid_dx, [lung_target]))
        else:
            rows.append(vqaseg_row(base, False))
    return rows
