#!/usr/bin/env python
"""Real image reading (issue 21 items 3-4): does the app show the model the same slice, whatever file it comes in?

    .venv/bin/python benchmarks/image_reading.py [--model DIR] [--out FILE.json]

Through the app's real infer task (`RadDiagSegInfer`, shipped demo model, inputs recorded at its ModelRunner):

1. one-slice files: an oblique (tilted 12 degrees, permuted and flipped), anisotropic 16-slice phantom CT is cut
   into 16 one-slice NIfTI files; per cut, is the model input / answer equal to the volume's `slice` k request, and
   does its label file keep the cut's 3D geometry (size with the single slice, spacing, origin, direction)?
2. app vs `raddiagseg predict`: on a small phantom build (2 CT volumes, 6 X-rays, VQA and Ref-Seg images), how many
   of 40 image files reach the model as the same array in the app and in predict (`sample_image`)?
3. MONOCHROME1: pydicom-data's chest CR RG3_UNCR.dcm against a MONOCHROME2 copy written with pydicom: same input,
   same answer?

Only public entry points are used, so the same script measures an older checkout (put its folders first on
PYTHONPATH) for a before/after.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from repo_paths import ROOT


def recording_task(model, folder):
    from lib.slice_cache import SliceCache
    from lib.infers.raddiagseg import RadDiagSegInfer
    from lib.model_runner import ModelRunner

    class Store:
        def get(self):
            return model, "bench"

        def current_dir(self):
            return folder

        def available(self):
            return True

    class Recording(ModelRunner):
        def answer(self, images, *args, **kwargs):
            self.inputs += [np.array(i) for i in images]
            return super().answer(images, *args, **kwargs)

    runner = Recording(Store(), SliceCache(64), drafts="off")
    runner.inputs = []
    return RadDiagSegInfer(Store(), runner)


def oblique_volume():
    from raddiagseg.data import phantoms

    phantom = phantoms.generate_ct(np.random.default_rng(4), "liver", size=80, slices=16, tumours=1)
    image = sitk.GetImageFromArray(phantom.hu.astype(np.int16))  # [S, P, L]
    dz, dr, dc = phantom.spacing
    image.SetSpacing((float(dc), float(dr), float(dz)))
    image = sitk.DICOMOrient(image, "PRI")
    angle = np.deg2rad(12.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    image.SetDirection(tuple((tilt @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    return image


def same_geometry(a, b):
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def one_slice_files(model, folder, tmp):
    volume = oblique_volume()
    path = tmp / "volume.nii.gz"
    sitk.WriteImage(volume, str(path))
    whole, single = recording_task(model, folder), recording_task(model, folder)
    counts = {"cuts": 0, "same_input": 0, "same_answer": 0, "label_geometry_equal": 0, "label_voxels_equal": 0}
    for k in range(volume.GetSize()[2]):
        cut = volume[:, :, k : k + 1]
        cut_path = tmp / f"cut_{k:02d}.nii.gz"
        sitk.WriteImage(cut, str(cut_path))
        volume_label, volume_answer = whole({"image": str(path), "slice": k})
        cut_label, cut_answer = single({"image": str(cut_path)})
        a, b = single.runner.inputs[-1], whole.runner.inputs[-1]
        written = sitk.ReadImage(cut_label)
        counts["cuts"] += 1
        counts["same_input"] += a.shape == b.shape and np.array_equal(a, b)
        counts["same_answer"] += cut_answer["answer"] == volume_answer["answer"]
        counts["label_geometry_equal"] += same_geometry(written, cut)
        voxels = sitk.GetArrayFromImage(written).reshape(-1)
        counts["label_voxels_equal"] += np.array_equal(voxels, sitk.GetArrayFromImage(sitk.ReadImage(volume_label))[k].ravel())
    return counts


def app_vs_predict(model, folder, tmp):
    from raddiagseg.data.builder import build_phantom_dataset
    from raddiagseg.data.records import read_manifest
    from raddiagseg.evaluation.predict import sample_image

    build_phantom_dataset(tmp / "data", ct_volumes=2, xrays=6, vqa_images=2, refseg_images=2, workers=1)
    by_image = {}
    for row in read_manifest(tmp / "data" / "manifest.jsonl", None, base=True):
        by_image.setdefault(row["image"], row)
    files = list(by_image.values())
    picked = [files[i] for i in np.linspace(0, len(files) - 1, 40).round().astype(int)]  # every source
    task = recording_task(model, folder)
    counts = {}
    for row in picked:
        task({"image": str(tmp / "data" / row["image"]), "max_new_tokens": 4})
        app, predict = task.runner.inputs[-1], sample_image(row)
        kind = counts.setdefault(f"{row['modality']} {row['image'].rsplit('.', 1)[-1]}",
                                 {"files": 0, "same_array": 0, "transposed": 0})
        kind["files"] += 1
        kind["same_array"] += app.shape == predict.shape and np.array_equal(app, predict)
        kind["transposed"] += app.shape == predict.T.shape and np.array_equal(app, predict.T)
    return counts


def monochrome1(model, folder, tmp):
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG3_UNCR.dcm")
    ds = pydicom.dcmread(path)
    top = 2 ** int(ds.BitsStored) - 1
    copy = ds.copy()
    copy.PhotometricInterpretation = "MONOCHROME2"
    copy.PixelData = (top - ds.pixel_array.astype(np.int32)).astype(np.uint16).tobytes()
    copy.WindowCenter = top - float(ds.WindowCenter)
    mono2 = tmp / "cr_monochrome2.dcm"
    copy.save_as(str(mono2))
    task = recording_task(model, folder)
    _, first = task({"image": path})
    _, second = task({"image": str(mono2)})
    a, b = task.runner.inputs
    return {"same_input": bool(a.shape == b.shape and np.array_equal(a, b)),
            "max_abs_input_difference": float(np.abs(a - b).max()) if a.shape == b.shape else None,
            "same_answer": first["answer"] == second["answer"], "answers": [first["answer"], second["answer"]]}


def main():
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "MONAILabelApp" / "model" / "raddiagseg-demo"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from lib.model_store import load_for_serving

    folder = Path(args.model)
    model = load_for_serving(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "a").mkdir(), (tmp / "b").mkdir(), (tmp / "c").mkdir()
        results = {"one_slice_files": one_slice_files(model, folder, tmp / "a"),
                   "app_vs_predict": app_vs_predict(model, folder, tmp / "b"),
                   "monochrome1_vs_monochrome2": monochrome1(model, folder, tmp / "c")}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
