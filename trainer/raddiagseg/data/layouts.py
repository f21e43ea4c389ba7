"""Write phantoms in the public datasets' own layouts (MSD, COVID-QU-Ex, VQA-RAD, SLAKE).

Why: the converters must read the real public folders; writing phantoms the same way runs
them end to end offline. File and folder names follow the public releases:
`Task03_Liver/imagesTr/liver_K.nii.gz`, `Infection Segmentation Data/Infection Segmentation
Data/Train/COVID-19/images/covid_K.png`, `VQA_RAD Dataset Public.json`, `imgs/xmlabK/source.jpg`.
"""

import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from tqdm import tqdm

from raddiagseg.data import phantoms

log = logging.getLogger(__name__)

MSD_TASKS = {
    "liver": {"folder": "Task03_Liver", "name": "Liver", "description": "Liver and liver tumor segmentation",
              "labels": {"0": "background", "1": "liver", "2": "cancer"}},
    "pancreas": {"folder": "Task07_Pancreas", "name": "Pancreas", "description": "Pancreas and pancreatic tumor segmentation",
                 "labels": {"0": "background", "1": "pancreas", "2": "cancer"}},
}
COVIDQU_ROOT = Path("Infection Segmentation Data") / "Infection Segmentation Data"
COVIDQU_SPLITS = (("Train", 0.64), ("Val", 0.16), ("Test", 0.20))
COVIDQU_FILE = {"COVID-19": "covid_{}.png", "Non-COVID": "non_COVID ({}).png", "Normal": "Normal ({}).png"}
# Direction-cosine layouts the phantoms are written in (the builder must undo them all).
ORIENTATIONS = (("L", "P", "S"), ("R", "A", "S"), ("L", "A", "S"), ("R", "P", "I"), ("P", "L", "S"), ("A", "R", "I"))


# Each phantom is drawn from its own generator, seeded by (seed, stream, index), so that any number of
# worker processes writes the same files as one process would.
STREAMS = {"liver": 1, "pancreas": 2, "covidqu": 3, "vqarad": 4, "slake": 5, "biomedparse": 6}


def item_rng(seed, stream, index):
    """The random generator of phantom `index` of `stream` (a STREAMS key) for `seed`."""
    return np.random.default_rng([int(seed), STREAMS[stream], int(index)])


def default_workers():
    """Processes to draw phantoms with: the CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _map_items(fn, items, workers, desc, unit):
    """`[fn(item) for item in items]` with a progress bar, over `workers` forked processes when > 1.

    Fork (not spawn): the workers need no re-import and callers need no `__main__` guard; they run
    numpy/scipy/nibabel/PIL only.
    """
    items = list(items)
    workers = max(1, min(int(workers or 1), len(items)))
    bar = tqdm(total=len(items), desc=desc, unit=unit, leave=False)
    try:
        if workers == 1:
            out = []
            for item in items:
                out.append(fn(item))
                bar.update(1)
            return out
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            out = []
            for result in pool.map(fn, items, chunksize=max(1, len(items) // (workers * 8))):
                out.append(result)
                bar.update(1)
            return out
    finally:
        bar.close()


def _display_to_lps(volume):
    """(z, row, col) display layout → array indexed (i → Left, j → Posterior, k → Superior)."""
    return np.ascontiguousarray(volume.transpose(2, 1, 0))


def _lps_affine(spacing, shape_lps, rng):
    """Affine of an LPS-indexed array in NIfTI RAS+ world, with a random origin."""
    sz, py, px = spacing
    lps = np.diag([px, py, sz, 1.0])
    lps[:3, 3] = -np.array(shape_lps) * np.array([px, py, sz]) / 2 + rng.uniform(-30, 30, 3)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def save_msd_volume(image_path, label_path, phantom, orientation, rng):
    """Write one phantom as MSD NIfTI image (int16 HU) + label (uint8), in direction-cosine layout `orientation`."""
    hu, label = _display_to_lps(phantom.hu), _display_to_lps(phantom.label)
    affine = _lps_affine(phantom.spacing, hu.shape, rng)
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("L", "P", "S")),
                                                nib.orientations.axcodes2ornt(orientation))
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, hu.shape)
    for path, data in ((image_path, hu), (label_path, label)):
        data = nib.orientations.apply_orientation(data, transform)
        image = nib.Nifti1Image(np.ascontiguousarray(data), new_affine)
        image.set_qform(new_affine, code=1)
        image.set_sform(new_affine, code=1)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        nib.save(image, str(path))


def _varies(rng, variation):
    """Whether this study draws its own acquisition: always for "scanner", never for "none", by chance for "mixed"."""
    if phantoms.VARIATIONS[variation] < 2:
        return False
    return variation != "mixed" or bool(rng.random() < phantoms.MIXED_SCANNER_SHARE)


def _ct_scan(rng, variation, flips=True):
    """The CTScan a phantom of `variation` is drawn with (None: generator version 1's reference acquisition)."""
    return phantoms.draw_ct_scan(rng, flips) if _varies(rng, variation) else None


def _xray_exposure(rng, variation, flips=True):
    return phantoms.draw_xray_exposure(rng, flips) if _varies(rng, variation) else None


def _write_msd_case(item, root, task, seed, size, slices, variation="none"):
    k = item
    rng = item_rng(seed, task, k)
    scan = _ct_scan(rng, variation)
    # Every 7th volume is tumour-free (MSD has such cases); small runs keep tumours in every split.
    tumours = 0 if k % 7 == 6 else int(rng.integers(1, 5) if task == "liver" else rng.integers(1, 3))
    phantom = phantoms.generate_ct(rng, task, size=size, slices=slices, tumours=tumours, scan=scan)
    name = f"{task}_{k}.nii.gz"
    orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    save_msd_volume(root / "imagesTr" / name, root / "labelsTr" / name, phantom, orientation, rng)
    return {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}


def write_msd(out, task, count, seed, size=None, slices=None, start_index=0, workers=1, variation="none"):
    """MSD task folder with `count` phantom volumes; returns the path of its dataset.json.

    variation "scanner" (generator version 2) is recorded in dataset.json as `generator_version`;
    version 1 writes the file as it always did (no such key).
    """
    spec = MSD_TASKS[task]
    root = Path(out) / spec["folder"]
    write = partial(_write_msd_case, root=root, task=task, seed=seed, size=size, slices=slices, variation=variation)
    training = _map_items(write, range(start_index, start_index + count), workers, f"CT {task}", "vol")
    meta = {"name": spec["name"], "description": spec["description"],
            "reference": "RadDiag synthetic phantoms (layout of the Medical Segmentation Decathlon)",
            "licence": "CC-BY-SA 4.0", "release": "1.0", "tensorImageSize": "3D",
            "modality": {"0": "CT"}, "labels": spec["labels"],
            "numTraining": len(training), "numTest": 0, "training": training, "test": []}
    if phantoms.VARIATIONS[variation] >= 2:
        meta["generator_version"], meta["variation"] = phantoms.VARIATIONS[variation], variation
    path = root / "dataset.json"
    path.write_text(json.dumps(meta, indent=4))
    return path


def _write_xray(item, root, seed, size, variation="none"):
    k, kind, split, name = item
    rng = item_rng(seed, "covidqu", k)
    xray = phantoms.generate_xray(rng, kind, size=size, exposure=_xray_exposure(rng, variation))
    folder = root / split / kind
    for sub, array in (("images", xray.image), ("lung masks", xray.lung * 255), ("infection masks", xray.infection * 255)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.astype(np.uint8)).save(folder / sub / name)
    return split, kind


def write_covidqu(out, count, seed, size=256, workers=1, variation="none"):
    """COVID-QU-Ex 'Infection Segmentation Data' tree with `count` X-rays spread over classes and splits.

    Masks are 0/255 PNGs; Non-COVID and Normal get blank infection masks, as in the release.
    Returns [(split, kind)] per image.
    """
    root = Path(out) / COVIDQU_ROOT
    numbers = {k: 0 for k in phantoms.XRAY_CLASSES}
    kinds = [phantoms.XRAY_CLASSES[i % 3] for i in range(count)]
    per_class = {k: kinds.count(k) for k in phantoms.XRAY_CLASSES}
    items = []
    for k, kind in enumerate(kinds):
        position = (numbers[kind] + 0.5) / per_class[kind]  # spread each class over the splits
        split = "Train" if position < 0.64 else "Val" if position < 0.8 else "Test"
        numbers[kind] += 1
        items.append((k, kind, split, COVIDQU_FILE[kind].format(numbers[kind])))
    return _map_items(partial(_write_xray, root=root, seed=seed, size=size, variation=variation), items, workers,
                      "X-rays", "img")


def _vqa_items(rng, kind, info):
    """(question, answer, answer_type, question_type) pairs about one phantom image."""
    items = []
    if kind == "ct":
        organ, abnormal = info["organ"], info["tumour"]
        items.append(("What imaging modality was used?", "CT", "OPEN", "MODALITY"))
        items.append((rng.choice(["Is this a CT scan?", "Was this image taken with CT?"]), "Yes", "CLOSED", "MODALITY"))
        items.append(("Is this an X-ray?", "No", "CLOSED", "MODALITY"))
        items.append((f"Is there a mass in the {organ}?", "Yes" if abnormal else "No", "CLOSED", "PRES"))
        items.append(("Is there any abnormality in this image?", "Yes" if abnormal else "No", "CLOSED", "ABN"))
        items.append(("Which organ is on the left side of the image?", "Liver", "OPEN", "ORGAN"))
        items.append(("Which part of the body is shown?", "Abdomen", "OPEN", "ORGAN"))
        if abnormal:
            items.append(("Which organ is abnormal?", organ.capitalize(), "OPEN", "ABN"))
            items.append(("What is the abnormality?", "Tumor", "OPEN", "ABN"))
    else:
        abnormal = info["class"] != "Normal"
        items.append(("What imaging modality was used?", "X-Ray", "OPEN", "MODALITY"))
        items.append(("Is this a chest X-ray?", "Yes", "CLOSED", "MODALITY"))
        items.append(("Is this a CT scan?", "No", "CLOSED", "MODALITY"))
        items.append(("Are the lungs clear?", "No" if abnormal else "Yes", "CLOSED", "PRES"))
        items.append(("Is there any abnormality in this image?", "Yes" if abnormal else "No", "CLOSED", "ABN"))
        items.append(("Which part of the body is shown?", "Chest", "OPEN", "ORGAN"))
        if info["class"] == "COVID-19":
            items.append(("What is the abnormality?", "Bilateral ground-glass opacities", "OPEN", "ABN"))
            items.append(("Are both lungs affected?", "Yes", "CLOSED", "POS"))
        elif info["class"] == "Non-COVID":
            items.append(("What is the abnormality?", "Consolidation", "OPEN", "ABN"))
            items.append(("Which lung is affected?", "Right" if info["side"] == 0 else "Left", "OPEN", "POS"))
            items.append(("Are both lungs affected?", "No", "CLOSED", "POS"))
    return items


def _vqa_image(i, rng, ct_size, variation="none"):
    """Fresh phantom image `i` for a VQA set (not shared with the segmentation sources): (kind, uint8 image, info).

    Never mirrored nor turned over: the questions name the side of the image an organ or an opacity is on."""
    if i % 2 == 0:
        task = phantoms.CT_TASKS[(i // 2) % 2]
        tumour = (i // 4) % 2 == 0
        scan = _ct_scan(rng, variation, flips=False)
        ct = phantoms.generate_ct(rng, task, size=ct_size or 192, slices=9, tumours=3 if tumour else 0, scan=scan)
        area = (ct.label == 2).sum((1, 2)) if tumour else (ct.label > 0).sum((1, 2))
        z = int(area.argmax())
        has = bool((ct.label[z] == 2).sum() >= 20)
        return "ct", phantoms.window_to_uint8(ct.hu[z]), {"organ": task, "tumour": has}
    kind = phantoms.XRAY_CLASSES[(i // 2) % 3]
    xray = phantoms.generate_xray(rng, kind, exposure=_xray_exposure(rng, variation, flips=False))
    side = int(np.argmax([xray.opacity[:, : xray.image.shape[1] // 2].sum(), xray.opacity[:, xray.image.shape[1] // 2:].sum()]))
    return "xray", xray.image, {"class": kind, "side": side}


def _write_vqa_image(i, stream, seed, ct_size, save, variation="none"):
    """Draw VQA image `i`, save it with `save(i, image)`; returns (kind, info, question items)."""
    rng = item_rng(seed, stream, i)
    kind, image, info = _vqa_image(i, rng, ct_size, variation)
    save(i, image)
    return kind, info, _vqa_items(rng, kind, info)


def _save_vqarad_image(i, image, root):
    Image.fromarray(image).save(root / "VQA_RAD Image Folder" / f"synpic{50000 + i}.jpg", quality=92)


def write_vqarad(out, count, seed, ct_size=None, workers=1, variation="none"):
    """`VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/synpicN.jpg`; the last fifth are `test_freeform`."""
    root = Path(out) / "VQA_RAD"
    (root / "VQA_RAD Image Folder").mkdir(parents=True, exist_ok=True)
    draw = partial(_write_vqa_image, stream="vqarad", seed=seed, ct_size=ct_size, save=partial(_save_vqarad_image, root=root),
                   variation=variation)
    rows, qid = [], 0
    for i, (kind, info, items) in enumerate(_map_items(draw, range(count), workers, "VQA-RAD", "img")):
        name = f"synpic{50000 + i}.jpg"
        phrase = "test_freeform" if i >= count * 0.8 else "freeform"
        for question, answer, answer_type, qtype in items:
            qid += 1
            rows.append({"qid": qid, "phrase_type": phrase, "qid_linked_id": f"{i:05d}", "image_case_url": "",
                         "image_name": name, "image_organ": "ABD" if kind == "ct" else "CHEST", "evaluation": "given",
                         "question": question, "question_rephrase": "NULL", "question_relation": "NULL",
                         "question_frame": "NULL", "question_type": qtype, "answer": answer, "answer_type": answer_type})
    path = root / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def _save_slake_image(i, image, root):
    folder = root / "imgs" / f"xmlab{i}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).convert("RGB").save(folder / "source.jpg", quality=92)


def write_slake(out, count, seed, ct_size=None, workers=1, variation="none"):
    """SLAKE layout: train.json / validate.json / test.json + imgs/xmlabN/source.jpg, with a few Chinese rows (q_lang zh)."""
    root = Path(out) / "SLAKE"
    splits = {"train": [], "validate": [], "test": []}
    draw = partial(_write_vqa_image, stream="slake", seed=seed, ct_size=ct_size, save=partial(_save_slake_image, root=root),
                   variation=variation)
    qid = 0
    for i, (kind, info, items) in enumerate(_map_items(draw, range(count), workers, "SLAKE", "img")):
        split = "test" if i >= count * 0.8 else "validate" if i >= count * 0.65 else "train"
        location = "Abdomen" if kind == "ct" else "Lung"
        modality = "CT" if kind == "ct" else "X-Ray"
        for question, answer, answer_type, qtype in items:
            qid += 1
            splits[split].append({"img_id": i, "img_name": f"xmlab{i}/source.jpg", "question": question,
                                  "answer": answer.lower(), "q_lang": "en", "location": location, "modality": modality,
                                  "answer_type": answer_type, "base_type": "vqa", "content_type": qtype.title(),
                                  "triple": ["vhead", "_", "_"], "qid": qid})
        qid += 1
        splits[split].append({"img_id": i, "img_name": f"xmlab{i}/source.jpg", "question": "这是什么成像方式？",
                              "answer": "CT" if kind == "ct" else "X光", "q_lang": "zh", "location": location,
                              "modality": modality, "answer_type": "OPEN", "base_type": "vqa",
                              "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": qid})
    for split, rows in splits.items():
        (root / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    return root


def _write_biomedparse_case(i, root, count, seed, ct_size, variation="none"):
    rng = item_rng(seed, "biomedparse", i)
    task = phantoms.CT_TASKS[i % 2]
    scan = _ct_scan(rng, variation)
    ct = phantoms.generate_ct(rng, task, size=ct_size or 192, slices=7, tumours=int(rng.integers(0, 3)), scan=scan)
    z = int(np.argmax((ct.label > 0).sum((1, 2))))
    split = "test" if i >= count * 0.8 else "train"
    stem = f"phantom{i}_{z}_CT_abdomen"
    masks = {task: ct.label[z] > 0, f"{task}+tumor": ct.label[z] == 2,
             **{name.replace(" ", "+"): m[z] > 0 for name, m in ct.others.items()}}
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}_mask").mkdir(parents=True, exist_ok=True)
    Image.fromarray(phantoms.window_to_uint8(ct.hu[z])).save(root / split / f"{stem}.png")
    for target, mask in masks.items():
        if mask.sum() >= 20:
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / f"{split}_mask" / f"{stem}_{target}.png")


def write_biomedparse(out, count, seed, ct_size=None, workers=1, variation="none"):
    """BiomedParse-style Ref-Seg folder: `train|test/<case>_CT_abdomen.png` + one mask per target in
    `train_mask|test_mask/<case>_CT_abdomen_<target+words>.png` (liver, pancreas, spleen, kidney, tumours).
    The last fifth of the images go to test."""
    root = Path(out) / "BiomedParse"
    _map_items(partial(_write_biomedparse_case, root=root, count=count, seed=seed, ct_size=ct_size, variation=variation),
               range(count), workers, "BiomedParse", "img")
    return root


def write_phantoms(out, ct_volumes, xrays, seed=0, ct_size=None, ct_slices=None, xray_size=256, vqa_images=None,
                   refseg_images=None, workers=None, variation="none"):
    """Everything `raddiagseg phantoms` writes. Returns a dict of the source paths for `build`.

    `workers` processes draw the phantoms (default: every CPU this process may use); the files do not
    depend on it. `variation` (a `phantoms.VARIATIONS` key): "none" = generator version 1, the files
    of every earlier release; "scanner" = version 2, studies that vary like real ones; "mixed" = each study
    "scanner" or version 1 by chance; recorded in `OUT/phantoms.json` and each MSD dataset.json.
    """
    if variation not in phantoms.VARIATIONS:
        raise ValueError(f"unknown phantom variation {variation!r}; expected one of {sorted(phantoms.VARIATIONS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = default_workers() if workers is None else workers
    version = phantoms.VARIATIONS[variation]
    n_liver = (ct_volumes + 1) // 2
    paths = {"msd": [], "covidqu": None, "vqarad": None, "slake": None, "refseg": None}
    for task, count in (("liver", n_liver), ("pancreas", ct_volumes - n_liver)):
        if count:
            write_msd(out, task, count, seed, size=ct_size, slices=ct_slices, workers=workers, variation=variation)
            paths["msd"].append(out / MSD_TASKS[task]["folder"])
    if xrays:
        write_covidqu(out / "COVID-QU-Ex", xrays, seed, size=xray_size, workers=workers, variation=variation)
        paths["covidqu"] = out / "COVID-QU-Ex"
    n_vqa = vqa_images if vqa_images is not None else max(10, (ct_volumes + xrays) // 3)
    if n_vqa:
        paths["vqarad"] = write_vqarad(out, n_vqa, seed, ct_size, workers=workers, variation=variation)
        paths["slake"] = write_slake(out, n_vqa, seed, ct_size, workers=workers, variation=variation)
    n_refseg = refseg_images if refseg_images is not None else max(6, ct_volumes)
    if n_refseg:
        paths["refseg"] = write_biomedparse(out, n_refseg, seed, ct_size, workers=workers, variation=variation)
    if version >= 2:
        (out / "phantoms.json").write_text(json.dumps({
            "generator_version": version, "variation": variation, "seed": seed, "ct_volumes": ct_volumes,
            "xrays": xrays, "ct_size": ct_size, "ct_slices": ct_slices, "xray_size": xray_size}, indent=1))
    return paths
