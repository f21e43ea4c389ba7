"""Domain guard numbers (issue 21): in-domain share of held-out phantoms of an unseen seed, every real file that
packages ship (score vs threshold), and the share flagged under each issue-22 shift.

    .venv/bin/python benchmarks/domain_guard.py [--model DIR] [--seed 31415] [--ct-volumes 26] [--xrays 240]
    .venv/bin/python benchmarks/domain_guard.py --sweep   # every image file the packages ship, through the app

Real files are read and windowed as the app reads them (`lib.image_io.model_view`, `lib.domain_guard.modality_of`;
volumes: the middle slice of the radiological view) and scored by the model folder's `domain_stats.safetensors`.
Every other file the packages ship is swept through the app by tests/test_domain_guard.py.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from repo_paths import ROOT


def real_files(folder):
    import nibabel.testing
    import skimage.data
    from PIL import Image
    from pydicom.data import get_testdata_file

    Image.fromarray(skimage.data.camera()).save(folder / "camera.png")
    Image.fromarray(skimage.data.retina()).save(folder / "retina.png")
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.png")
    files = {name: get_testdata_file(name) for name in (
        "CT_small.dcm", "MR_small.dcm", "693_UNCI.dcm", "RG1_UNCI.dcm", "RG3_UNCI.dcm", "MR2_UNCI.dcm", "JPEG2000.dcm")}
    files["nibabel anatomical.nii"] = str(Path(nibabel.testing.data_path) / "anatomical.nii")
    files.update({f"skimage {n}.png": str(folder / f"{n}.png") for n in ("camera", "retina", "astronaut")})
    return {k: v for k, v in files.items() if v}


PACKAGE_FOLDERS = {  # package: (folder inside it, file patterns) of the real files it ships
    "pydicom": ("data/test_files", ("*.dcm",)), "data_store": ("data", ("*.dcm",)),  # data_store: pydicom-data
    "nibabel": ("tests/data", ("*.nii", "*.nii.gz", "*.mgz", "*.hdr", "*.mnc", "*.dcm", "*.REC", "*.HEAD")),
    "skimage": ("data", ("*.png", "*.jpg", "*.tif", "*.gif")),
}


def package_files():
    """(name, path) of every file in the test-data folders of pydicom, pydicom-data, nibabel and scikit-image that
    a user could send as an image (DICOM of every kind: CT, MR, enhanced MR/CT, CR, US, NM, secondary captures,
    RT dose/plan/struct, SEG, SR, ECG waveforms; NIfTI 1/2, Analyze, MINC, MGH, PAR/REC, AFNI; PNG/JPEG/TIFF/GIF)."""
    import importlib.util

    files = []
    for package, (sub, patterns) in PACKAGE_FOLDERS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for pattern in patterns:
            files += [(f"{package}/{p.relative_to(root)}", p) for p in sorted((root / sub).glob(pattern))]
    return files


def dicom_tag(path):
    """The DICOM Modality pydicom reads from `path` (upper case), or "" (no tag, or not a DICOM it can parse)."""
    import pydicom

    try:
        return str(pydicom.dcmread(str(path), stop_before_pixels=True, force=True).get("Modality", "")).strip().upper()
    except Exception:
        return ""


def outcome(infer, path):
    """What the app's infer task does with one file: ("refused" | "answered" | "rejected" | "error", detail)."""
    from fastapi import HTTPException

    try:
        result = infer(path)
    except HTTPException as error:
        return ("rejected" if 400 <= error.status_code < 500 and str(error.detail).strip() else "error",
                f"{error.status_code}: {error.detail}")
    except Exception as error:  # what the server would turn into a 500
        return "error", f"{type(error).__name__}: {error}"
    refused = (result["domain"]["in_domain"] is False and result["detection"] is None and result["diagnosis"] is None
               and result["segments"] == [] and result["answer"].startswith("Not answered"))
    return ("refused" if refused else "answered"), result


def app_infer(work):
    """Callable(path, **params) -> the app's infer task's JSON result (as the server builds the task)."""
    import os

    from lib.configs.raddiagseg import RadDiagSegAppConfig

    task = RadDiagSegAppConfig(str(ROOT / "MONAILabelApp"), None, {"work_dir": str(work)}).infer()

    def run(path, **params):
        label, result = task({"image": str(path), **params})
        os.unlink(label)
        return result

    run.task = task
    return run


def sweep(work):
    """Every file of `package_files` through the app: a table per package and how the DICOMs were read."""
    infer = app_infer(work)
    counts, modalities = {}, {}
    for name, path in package_files():
        kind, detail = outcome(infer, path)
        row = counts.setdefault(name.split("/")[0], {"files": 0, "refused": 0, "rejected": 0, "answered": 0, "error": 0})
        row["files"] += 1
        row[kind] += 1
        if kind in ("answered", "error"):
            print(f"  {name}: {kind} {str(detail)[:200]}")
        if isinstance(detail, dict):
            key = f"{detail['modality']['value']} ({detail['modality']['source']})"
            modalities[key] = modalities.get(key, 0) + 1
    print("\n| package | files | refused (no detection/diagnosis/segments) | rejected (4xx) | answered | 5xx / error |")
    print("|---|---|---|---|---|---|")
    for package, row in counts.items():
        print(f"| {package} | {row['files']} | {row['refused']} | {row['rejected']} | {row['answered']} | {row['error']} |")
    print("\nread as: " + ", ".join(f"{k} {v}" for k, v in sorted(modalities.items())))


def score_file(model, guard, path):
    """(modality read as, verdict) of the file's middle slice, read, oriented and windowed as the app does
    (`ModelView.unit`: the file's own window where it has one)."""
    import torch

    from lib import domain_guard, image_io

    image = image_io.read_image(path)
    array = image_io.image_array(image)
    read_as = domain_guard.modality_of(image, array)
    view = image_io.model_view(image, array, read_as["value"])
    unit = view.unit(view.n_slices // 2)
    with torch.inference_mode():
        features = model.encode_images([unit])
    return read_as, guard.check(features, [unit], read_as["value"], read_as["source"])[0]


def flagged_share(stats, descriptors):
    return {m: float(np.mean(stats.scores(d, m) > stats.thresholds[m])) for m, d in descriptors.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "MONAILabelApp" / "model" / "raddiagseg-demo")
    parser.add_argument("--seed", type=int, default=31415, help="held-out phantom seed (not 1234, 2718)")
    parser.add_argument("--ct-volumes", type=int, default=26)
    parser.add_argument("--xrays", type=int, default=240)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--sweep", action="store_true",
                        help="instead: every image file pydicom, pydicom-data, nibabel and scikit-image ship, through the app")
    args = parser.parse_args()
    if args.sweep:
        with tempfile.TemporaryDirectory() as tmp:
            return sweep(args.work or Path(tmp))

    import torch
    from raddiagseg import domain, load_model
    from raddiagseg.evaluation import robustness

    torch.set_num_threads(1)
    model = load_model(args.model).eval()
    guard = domain.DomainGuard.for_model_dir(args.model)
    stats = guard.stats
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        manifest = domain.phantom_manifest(work, args.seed, args.ct_volumes, args.xrays)
        held_out = domain.manifest_descriptors(model, manifest)
        print(f"## held-out phantoms, seed {args.seed}\n\n| modality | images | in domain | max score | threshold |")
        print("|---|---|---|---|---|")
        for m, d in held_out.items():
            scores = stats.scores(d, m)
            print(f"| {m} | {len(scores)} | {np.mean(scores <= stats.thresholds[m]):.1%} | {scores.max():.3f} | "
                  f"{stats.thresholds[m]:.3f} |")

        print("\n## real files\n\n| file | read as (source) | in domain | score | threshold | score / threshold |")
        print("|---|---|---|---|---|---|")
        folder = work / "real"
        folder.mkdir(exist_ok=True)
        for name, path in real_files(folder).items():
            read_as, v = score_file(model, guard, path)
            ratio = f"{v['score'] / v['threshold']:.1f}" if v["score"] is not None else "– (modality)"
            print(f"| {name} | {read_as['value']} ({read_as['source']}) | {v['in_domain']} | {v['score']} | "
                  f"{v['threshold']} | {ratio} |")

        print("\n## issue-22 shifts of the same held-out sources: share flagged\n\n| shift | CT | X-ray |\n|---|---|---|")
        sources = work / f"seed{args.seed}" / "sources"
        for name in robustness.SHIFTS:
            if name == "none":
                continue
            shifted = work / "shift" / robustness.shift_folder_name(name)
            robustness.shift_sources(sources, shifted / "sources", name, args.seed)
            built = robustness.build_sources(shifted / "sources", shifted / "built")
            share = flagged_share(stats, domain.manifest_descriptors(model, built))
            cells = [f"{share[m]:.1%}" if robustness.applies(name, m) and m in share else "–" for m in ("ct", "xray")]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
