"""How a model holds up under ordinary scanner variation: held-out phantoms, post-processed per shift.

Each shift rewrites the held-out *source* files (MSD volumes in LPS, the COVID-QU-Ex PNG tree) the way
studies really differ, masks moved with the same geometry, then `raddiagseg build` converts them as it
would real downloads and `evaluate_model` (the scoring of `raddiagseg predict` + `score`) scores the
3-step answers per modality. Magnitudes are the issue's table. The "scanner phantoms" row scores
generator-version-2 phantoms (`raddiagseg phantoms --variation scanner`) of the same seeds instead.
"""

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

log = logging.getLogger(__name__)

CT_AIR = -1000.0
SOFT_TISSUE_HU = 40.0  # the centre of the contrast shift (the CT window level)
# name → (what it does to a CT volume in LPS (hu, label, rng), to an X-ray (image, masks, rng)); None: not applied.
SHIFTS = {
    "none": (lambda hu, label, rng: (hu, label), lambda image, masks, rng: (image, masks)),
    "CT contrast ×0.6 around soft tissue": (
        lambda hu, label, rng: (SOFT_TISSUE_HU + 0.6 * (hu - SOFT_TISSUE_HU), label), None),
    "thick slices (3 neighbouring slices averaged)": (
        lambda hu, label, rng: (ndimage.uniform_filter1d(hu, 3, axis=2, mode="nearest"), label), None),
    "rotation 20°": (
        lambda hu, label, rng: (ndimage.rotate(hu, 20, axes=(0, 1), reshape=False, order=1, cval=CT_AIR),
                                ndimage.rotate(label, 20, axes=(0, 1), reshape=False, order=0, cval=0)),
        lambda image, masks, rng: (ndimage.rotate(image, 20, reshape=False, order=1, cval=0),
                                   [ndimage.rotate(m, 20, reshape=False, order=0, cval=0) for m in masks])),
    "X-ray gamma 2": (None, lambda image, masks, rng: (255.0 * (image / 255.0) ** 2, masks)),
    "noise (CT σ 30 HU, X-ray σ 20)": (
        lambda hu, label, rng: (hu + rng.normal(0, 30, hu.shape), label),
        lambda image, masks, rng: (image + rng.normal(0, 20, image.shape), masks)),
    "mirrored left-right": (
        lambda hu, label, rng: (hu[::-1], label[::-1]),  # LPS axis 0 runs to the patient's left
        lambda image, masks, rng: (image[:, ::-1], [m[:, ::-1] for m in masks])),
}
SCANNER_ROW = "scanner phantoms (generator version 2)"
METRICS = ("detection_f1", "diagnosis_f1", "dice_org", "dice_abn")
TARGETS = {"detection_f1": 0.90, "diagnosis_f1": 0.85}  # under each shift, per modality


def write_sources(out, seed, ct_volumes, xrays, ct_slices, variation="none", workers=None):
    """Held-out segmentation sources only (MSD + COVID-QU-Ex: the 3-step rows); returns write_phantoms' paths."""
    from raddiagseg.data.layouts import write_phantoms

    return write_phantoms(out, ct_volumes, xrays, seed=seed, ct_slices=ct_slices, vqa_images=0, refseg_images=0,
                          workers=workers, variation=variation)


def shift_sources(src, dst, name, seed):
    """Copy the sources `src` to `dst` with shift `name` applied (geometry applied to the masks too)."""
    ct_fn, xray_fn = SHIFTS[name]
    src, dst = Path(src), Path(dst)
    for index, meta_path in enumerate(sorted(src.glob("Task*/dataset.json"))):
        if ct_fn is None:
            break
        task = meta_path.parent
        (dst / task.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(meta_path, dst / task.name / "dataset.json")
        for k, entry in enumerate(json.loads(meta_path.read_text())["training"]):
            _shift_volume(task, dst / task.name, entry, ct_fn, np.random.default_rng([seed, 1, index, k]))
    images = sorted(src.rglob("images/*.png"))
    for k, image_path in enumerate(images if xray_fn is not None else ()):
        folder = image_path.parent.parent
        mask_paths = [folder / sub / image_path.name for sub in ("lung masks", "infection masks")]
        image = np.asarray(Image.open(image_path), np.float32)
        masks = [np.asarray(Image.open(p)) for p in mask_paths]
        image, masks = xray_fn(image, masks, np.random.default_rng([seed, 2, k]))
        for path, array in ((image_path, np.clip(np.round(image), 0, 255)), *zip(mask_paths, masks)):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(array).astype(np.uint8)).save(target)


def _shift_volume(task, out, entry, fn, rng):
    from raddiagseg.data import io

    hu, affine = io.load_volume_lps(task / entry["image"], np.float32)
    label, _ = io.load_volume_lps(task / entry["label"])
    hu, label = fn(hu, label, rng)
    for rel, data in ((entry["image"], np.clip(np.round(hu), -1024, 3071).astype(np.int16)),
                      (entry["label"], np.ascontiguousarray(label).astype(np.uint8))):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))


def build_sources(sources, out):
    """Build the MSD and COVID-QU-Ex layouts under `sources` into a dataset at `out`; returns its manifest."""
    from raddiagseg.data.builder import build_dataset

    sources = Path(sources)
    msd = sorted(p for p in sources.glob("Task*") if p.is_dir())
    covidqu = sources / "COVID-QU-Ex" if (sources / "COVID-QU-Ex").is_dir() else None
    rows, report = build_dataset(out, msd=msd, covidqu=covidqu)
    if not rows:
        raise ValueError(f"nothing built from {sources}: {report.summary()}")
    return Path(out) / "manifest.jsonl"


def robustness_table(model, work, seeds, ct_volumes=6, xrays=36, ct_slices=12, shifts=None, scanner=True,
                     batch_size=8, workers=1):
    """Score `model` (a loaded model or its folder) on held-out phantoms of `seeds` under each shift.

    Returns {row name: {"ct" | "xray": {metric: value pooled over the seeds}, "per_seed": {seed: report}}};
    rows are `shifts` (default every SHIFTS key) and, with `scanner`, SCANNER_ROW.
    """
    from raddiagseg.evaluation import scoring
    from raddiagseg.evaluation.predict import evaluate_model, model_from

    model = model_from(model)
    work = Path(work)
    names = list(shifts or SHIFTS)
    rows = {name: {"records": [], "per_seed": {}} for name in names + ([SCANNER_ROW] if scanner else [])}
    for seed in seeds:
        clean = work / f"seed{seed}" / "sources"
        if not (clean / "COVID-QU-Ex").is_dir():
            write_sources(clean, seed, ct_volumes, xrays, ct_slices, workers=workers)
        variants = [(name, work / f"seed{seed}" / shift_folder_name(name)) for name in names]
        if scanner:
            variants.append((SCANNER_ROW, work / f"seed{seed}" / "scanner"))
        for name, folder in variants:
            if name == SCANNER_ROW:
                if not (folder / "sources" / "COVID-QU-Ex").is_dir():
                    write_sources(folder / "sources", seed, ct_volumes, xrays, ct_slices, "scanner", workers)
                sources = folder / "sources"
            elif name == "none":
                sources = clean
            else:
                sources = folder / "sources"
                if sources.exists():
                    shutil.rmtree(sources)
                shift_sources(clean, sources, name, seed)
            manifest = build_sources(sources, folder / "built")
            report, records = evaluate_model(model, manifest, split=None, tasks=("vqaseg",), batch_size=batch_size,
                                             return_records=True)
            rows[name]["records"] += records
            rows[name]["per_seed"][seed] = report
            log.info("seed %s, %s: %s", seed, name, _brief(report))
    table = {}
    for name, row in rows.items():
        pooled = scoring.build_report(row["records"], scoring.run_settings())
        table[name] = {m: pooled.get(m) for m in ("ct", "xray")} | {"per_seed": row["per_seed"]}
    return table


def shift_folder_name(name):
    """The folder name of shift `name` (letters and digits, at most 40 characters)."""
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")[:40]


def _brief(report):
    return {m: {k: report.get(m, {}).get(k) for k in ("n", "detection_f1", "diagnosis_f1")} for m in ("ct", "xray")}


def _cell(metrics, key):
    value = (metrics or {}).get(key)
    return "–" if value is None else f"{value:.3f}"


def applies(name, modality):
    """Whether shift `name` changes images of `modality` ("ct" | "xray")."""
    if name == SCANNER_ROW:
        return True
    return SHIFTS[name][0 if modality == "ct" else 1] is not None


def markdown(table):
    """The table: one row per shift, detection / diagnosis F1 and Dice-Org / Dice-Abn per modality (pooled over the
    seeds); a shift that does not touch a modality shows –; under a shift, F1 below TARGETS is bold."""
    head = "| shift | n CT / X-ray | " + " | ".join(f"{mod} {label}" for mod in ("CT", "X-ray")
                                                 for label in ("det F1", "diag F1", "Dice-Org", "Dice-Abn")) + " |"
    lines = [head, "|---|---|" + "---|" * 8]
    for name, row in table.items():
        cells = []
        for modality in ("ct", "xray"):
            metrics = row.get(modality) if applies(name, modality) else None
            for key in METRICS:
                text = _cell(metrics, key)
                if name != "none" and key in TARGETS and metrics and metrics.get(key) is not None \
                        and metrics[key] < TARGETS[key]:
                    text = f"**{text}**"
                cells.append(text)
        counts = " / ".join(str((row.get(m) or {}).get("n", 0)) if applies(name, m) else "–" for m in ("ct", "xray"))
        lines.append(f"| {name} | {counts} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_seed_markdown(table, row="none"):
    """Row `row` (default the clean one) per seed: n, detection / diagnosis F1, Dice-Org / Dice-Abn per modality."""
    lines = ["| seed | modality | n | det F1 | diag F1 | Dice-Org | Dice-Abn |", "|---|---|---|---|---|---|---|"]
    for seed, report in table[row]["per_seed"].items():
        for modality in ("ct", "xray"):
            m = report.get(modality) or {}
            lines.append(f"| {seed} | {modality} | {m.get('n', 0)} | " + " | ".join(_cell(m, k) for k in METRICS) + " |")
    return "\n".join(lines) + "\n"
