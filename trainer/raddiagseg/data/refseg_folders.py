"""BiomedParse-style Ref-Seg folders → `refseg` rows.

Layout (BiomedParseData): `train/` and `test/` hold 2D images named `<case>_<MODALITY>_<site>.png`
(MODALITY: CT, MRI, X-Ray, …); `train_mask/` and `test_mask/` hold one binary mask per target,
named `<image stem>_<target words joined by +>.png` (e.g. `liver_3_slice_042_CT_abdomen_liver+tumor.png`).
Target text is mapped to the vocabulary's canonical name when it names a known target; other
targets keep their own (lower-case) name. 10 % of the training images become val.
"""

import bisect
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from raddiagseg import vocabulary
from raddiagseg.data import io
from raddiagseg.data.covidqu import safe_stem
from raddiagseg.data.records import assign_splits, refseg_row

log = logging.getLogger(__name__)

MODALITY_TOKENS = {"ct": "ct", "mri": "mri", "x-ray": "xray", "xray": "xray"}
ABNORMAL_WORDS = ("tumor", "tumour", "lesion", "cancer", "infection", "nodule", "mass", "opacity", "edema", "effusion")


def _target(text):
    words = text.replace("+", " ").strip()
    canonical = vocabulary.canonical_target(words)
    name = canonical or vocabulary.normalise_label(words)
    role = vocabulary.targets()[canonical]["role"] if canonical else (
        "abnormality" if any(w in name for w in ABNORMAL_WORDS) else "organ")
    return name, role


def _modality(stem):
    for token in reversed(stem.split("_")):
        if token.lower() in MODALITY_TOKENS:
            return MODALITY_TOKENS[token.lower()]
    return None


def _masks_of(stem, sorted_names, folder):
    """Mask files named `<stem>_<target>.png` (a sorted-name prefix scan: no glob, so brackets in names are safe)."""
    prefix, found = stem + "_", []
    for name in sorted_names[bisect.bisect_left(sorted_names, prefix):]:
        if not name.startswith(prefix):
            break
        found.append(folder / name)
    return found


def convert_refseg(directory, out, report, seed=0):
    directory = Path(directory)
    rows = []
    for split_name in ("train", "test"):
        images_dir, masks_dir = directory / split_name, directory / f"{split_name}_mask"
        if not images_dir.is_dir():
            continue
        if not masks_dir.is_dir():
            report.skip(masks_dir, "missing mask folder")
            continue
        images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))
        mask_names = sorted(p.name for p in masks_dir.iterdir() if p.suffix.lower() == ".png")
        splits = ({p.stem: "test" for p in images} if split_name == "test"
                  else assign_splits([p.stem for p in images], seed, "refseg", fractions=(0.9, 0.1, 0.0)))
        for path in tqdm(images, desc=f"refseg {split_name}", unit="img", leave=False):
            modality = _modality(path.stem)
            if modality is None:
                report.skip(path, "no modality token (CT, MRI, X-Ray) in the file name")
                continue
            masks = _masks_of(path.stem, mask_names, masks_dir)
            if not masks:
                report.skip(path, f"no masks named {path.stem}_<target>.png in {masks_dir}")
                continue
            try:
                image = io.read_slice(path)
            except ValueError as exc:
                report.skip(path, str(exc))
                continue
            stem = safe_stem(path.name)
            image_rel = f"images/refseg/{stem}.png"
            written = False
            for mask_path in masks:
                try:
                    mask = io.read_slice(mask_path)
                except ValueError as exc:
                    report.skip(mask_path, str(exc))
                    continue
                if mask.shape != image.shape:
                    report.skip(mask_path, f"mask shape {mask.shape} differs from image shape {image.shape}")
                    continue
                mask = (mask > 127).astype(np.uint8)
                if not mask.any():
                    report.skip(mask_path, "empty mask")
                    continue
                name, role = _target(mask_path.stem[len(path.stem) + 1:])
                if not written:
                    io.write_png(Path(out) / image_rel, image)
                    written = True
                target = {"name": name, "role": role, "mask": f"masks/refseg/{stem}_{safe_stem(name)}.png"}
                io.write_png(Path(out) / target["mask"], mask)
                base = {"id": f"refseg_{stem}_{safe_stem(name)}", "source": "refseg", "modality": modality,
                        "split": splits[path.stem], "image": image_rel, "window": None, "volume": None, "slice": None}
                rows.append(refseg_row(base, target))
    if not rows:
        report.skip(directory, "no usable Ref-Seg images (expected train/ + train_mask/ or test/ + test_mask/)")
    return rows
