"""Shared by the retraining benchmarks: phantom studies with their ground truth, saved as a clinician's
corrections into a real MONAI Label datastore, the app's own train task, and held-out scoring.

A correction is what the Slicer module's Submit (or `PUT /datastore/label`) stores: the full label volume or
X-ray label with its label info (segments, detection, diagnosis), tag `final`.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from repo_paths import ROOT

from raddiagseg.data import phantoms
from raddiagseg.data.records import diagnosis_for

APP_DIR = ROOT / "MONAILabelApp"
DEMO_MODEL = APP_DIR / "model" / "raddiagseg-demo"


@dataclass
class Study:
    image_id: str
    modality: str
    kind: str  # liver | pancreas | COVID-19 | Non-COVID | Normal
    label_path: Path
    info: dict


def _ct(seed, task, slices, variation="none"):
    rng = np.random.default_rng(seed)
    phantom = phantoms.generate_ct(rng, task, slices=slices, scan=phantoms.draw_ct_scan(rng) if variation == "scanner" else None)
    images = []
    for array in (phantom.hu.astype(np.int16), phantom.label.astype(np.uint8)):
        image = sitk.GetImageFromArray(array)  # (z, row, col) = S, P, L: identity direction is LPS
        dz, dr, dc = phantom.spacing
        image.SetSpacing((float(dc), float(dr), float(dz)))
        images.append(image)
    tumour = f"{task} tumour"
    detection = bool(phantom.n_tumours and (phantom.label == 2).any())
    info = {"segments": [{"name": task, "label_value": 1}, {"name": tumour, "label_value": 2}],
            "detection": detection, "diagnosis": diagnosis_for(task, tumour) if detection else None, "modality": "ct"}
    return images[0], images[1], info


def _xray(seed, kind, variation="none"):
    rng = np.random.default_rng(seed)
    phantom = phantoms.generate_xray(rng, kind, exposure=phantoms.draw_xray_exposure(rng) if variation == "scanner" else None)
    label = phantom.lung.astype(np.uint8)
    segments = [{"name": "lung", "label_value": 1}]
    if kind == "COVID-19":
        label[phantom.infection > 0] = 2
        segments.append({"name": "infection", "label_value": 2})
    diagnosis = {"COVID-19": diagnosis_for("lung", "infection"), "Non-COVID": diagnosis_for("lung", None)}.get(kind)
    info = {"segments": segments, "detection": kind != "Normal", "diagnosis": diagnosis, "modality": "xray"}
    return sitk.GetImageFromArray(phantom.image), sitk.GetImageFromArray(label), info


def write_pool(studies_dir, truth_dir, kinds, seed, ct_slices=12, variation="none"):
    """Write one study per entry of `kinds` (e.g. ["liver", "COVID-19", ...]) drawn from `seed` + its index into
    `studies_dir`, its ground truth into `truth_dir`; returns {image_id: Study}. `variation` "scanner": each study
    with its own acquisition (generator version 2: contrast phase, kernel, slice thickness, position, exposure ...)."""
    studies_dir, truth_dir = Path(studies_dir), Path(truth_dir)
    studies_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    pool = {}
    for index, kind in enumerate(kinds):
        ct = kind in phantoms.CT_TASKS
        image_id = f"{'ct' if ct else 'cxr'}_{index:03d}_{kind.lower().replace('-', '')}"
        image, label, info = _ct(seed + index, kind, ct_slices, variation) if ct else _xray(seed + index, kind, variation)
        suffix = ".nii.gz" if ct else ".png"
        sitk.WriteImage(image, str(studies_dir / f"{image_id}{suffix}"))
        label_path = truth_dir / f"{image_id}.nii.gz"
        sitk.WriteImage(label, str(label_path))
        pool[image_id] = Study(image_id, "ct" if ct else "xray", kind, label_path, info)
    return pool


def datastore(studies_dir):
    from monailabel.datastore.local import LocalDatastore

    return LocalDatastore(str(studies_dir), extensions=["*.nii.gz", "*.png"], auto_reload=False)


def correct(store, study):
    """Save the study's ground truth as the clinician's final label (what PUT /datastore/label does)."""
    store.save_label(study.image_id, str(study.label_path), "final", dict(study.info))


def app_config(studies_dir, work_dir, model_path=DEMO_MODEL, reference_cache=None, **conf):
    """The app's `raddiagseg` configuration (store, runner, train task, strategies), as the server builds it.

    `reference_cache`: a folder shared by several work dirs for the regenerated reference phantoms and the served
    model's scores on them (the train task keeps them in WORK/reference), so each run does not redo them."""
    from lib.configs.raddiagseg import RadDiagSegAppConfig

    if reference_cache is not None:
        Path(reference_cache).mkdir(parents=True, exist_ok=True)
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        link = Path(work_dir) / "reference"
        if not link.exists():
            link.symlink_to(Path(reference_cache).resolve(), target_is_directory=True)

    return RadDiagSegAppConfig(str(APP_DIR), str(studies_dir), {"model_path": str(model_path), "work_dir": str(work_dir),
                                                            "device": "cpu", **{k: str(v) for k, v in conf.items()}})


def heldout_manifest(folder, seed, ct_volumes, xrays, ct_slices=12, variation="none"):
    """A held-out phantom dataset (never trained on, not the gate's reference seed) of generator `variation`; built once."""
    from raddiagseg.data.builder import build_phantom_dataset

    folder = Path(folder)
    if not (folder / "manifest.jsonl").is_file():
        build_phantom_dataset(folder, ct_volumes=ct_volumes, xrays=xrays, seed=seed, ct_slices=ct_slices,
                              vqa_images=0, refseg_images=0, workers=1, variation=variation)
    return folder / "manifest.jsonl"


METRICS = ("detection_f1", "diagnosis_f1", "dice_org", "dice_abn", "refseg_dice")


def score(model_dir, manifest):
    """{modality: {metric: value}} + row count of a model folder on every vqaseg / refseg row of `manifest`."""
    from raddiagseg.evaluation import evaluate_model
    from raddiagseg.training import selection

    report = evaluate_model(str(model_dir), str(manifest), split=None, tasks=("vqaseg", "refseg"))
    metrics = {m: {k: None if v is None else round(float(v), 4) for k, v in values.items()}
               for m, values in selection.per_modality(report, METRICS).items()}
    rows = int(report["overall"]["n"]) + int(report["overall"]["n_refseg"])
    return {"metrics": metrics, "score": round(selection.selection_score(report), 4), "rows": rows}


def add_run_arguments(parser, out, steps, seed_help, heldout_ct, heldout_xrays):
    """The arguments every retraining benchmark takes: output folder, train steps, phantom seeds, held-out size."""
    parser.add_argument("--out", default=out)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--seed", type=int, default=31337, help=seed_help)
    parser.add_argument("--heldout-seed", type=int, default=4242)
    parser.add_argument("--heldout-ct", type=int, default=heldout_ct)
    parser.add_argument("--heldout-xrays", type=int, default=heldout_xrays)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=str(DEMO_MODEL), help="the served (start) model folder")
    parser.add_argument("--variation", choices=("none", "scanner"), default="none",
                        help="phantom generator of the corrections and the held-out set: 'scanner' (version 2) gives "
                             "studies the demo model has not seen the like of, for a start model with something to learn")


def start_run(args):
    """(output folder, held-out manifest) for parsed `add_run_arguments`; sets torch's thread count."""
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, heldout_manifest(out / "heldout", args.heldout_seed, args.heldout_ct, args.heldout_xrays,
                                 variation=args.variation)


def cell(metrics, modality, key):
    """A metric of a `score` result for a Markdown table ('–' where the model has none)."""
    value = metrics.get(modality, {}).get(key)
    return "–" if value is None else f"{value:.3f}"


def largest_drop(metrics, reference):
    """(drop, 'modality metric') of the metric that fell most below `reference`'s (negative: none fell)."""
    return max((reference[m][k] - (metrics.get(m, {}).get(k) or 0.0), f"{m} {k}")
               for m in reference for k in reference[m] if reference[m][k] is not None)
