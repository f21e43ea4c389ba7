"""Write phantoms in the public datasets' own layouts (MSD, COVID-QU-Ex, VQA-RAD, SLAKE).

Why: the converters must read the real public folders; writing phantoms the same way runs
them end to end offline. File and folder names follow the public releases:
`Task03_Liver/imagesTr/liver_K.nii.gz`, `Infection Segmentation Data/Infection Segmentation
Data/Train/COVID-19/images/covid_K.png`, `VQA_RAD Dataset Public.json`, `imgs/xmlabK/source.jpg`.
"""

import json
import logging
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


def write_msd(out, task, count, rng, size=None, slices=None, start_index=0):
    """MSD task folder with `count` phantom volumes; returns the phantoms (for the VQA sets)."""
    spec = MSD_TASKS[task]
    root = Path(out) / spec["folder"]
    training, made = [], []
    for k in tqdm(range(start_index, start_index + count), desc=f"CT {task}", unit="vol", leave=False):
        # Every 7th volume is tumour-free (MSD has such cases); small runs keep tumours in every split.
        tumours = 0 if k % 7 == 6 else int(rng.integers(1, 5) if task == "liver" else rng.integers(1, 3))
        phantom = phantoms.generate_ct(rng, task, size=size, slices=slices, tumours=tumours)
        name = f"{task}_{k}.nii.gz"
        orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
        save_msd_volume(root / "imagesTr" / name, root / "labelsTr" / name, phantom, orientation, rng)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        made.append(phantom)
    meta = {"name": spec["name"], "description": spec["description"],
            "reference": "RadDiag synthetic phantoms (layout of the Medical Segmentation Decathlon)",
            "licence": "CC-BY-SA 4.0", "release": "1.0", "tensorImageSize": "3D",
            "modality": {"0": "CT"}, "labels": spec["labels"],
            "numTraining": len(training), "numTest": 0, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    return made


def write_covidqu(out, count, rng, size=256):
    """COVID-QU-Ex 'Infection Segmentation Data' tree with `count` X-rays spread over classes and splits.

    Masks are 0/255 PNGs; Non-COVID and Normal get blank infection masks, as in the release.
    Returns [(split, kind, XrayPhantom)].
    """
    root = Path(out) / COVIDQU_ROOT
    made, numbers = [], {k: 0 for k in phantoms.XRAY_CLASSES}
    kinds = [phantoms.XRAY_CLASSES[i % 3] for i in range(count)]
    per_class = {k: kinds.count(k) for k in phantoms.XRAY_CLASSES}
    for kind in tqdm(kinds, desc="X-rays", unit="img", leave=False):
        position = (numbers[kind] + 0.5) / per_class[kind]  # spread each class over the splits
        split = "Train" if position < 0.64 else "Val" if position < 0.8 else "Test"
        numbers[kind] += 1
        name = COVIDQU_FILE[kind].format(numbers[kind])
        xray = phantoms.generate_xray(rng, kind, size=size)
        folder = root / split / kind
        for sub, array in (("images", xray.image), ("lung masks", xray.lung * 255), ("infection masks", xray.infection * 255)):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array.astype(np.uint8)).save(folder / sub / name)
        made.append((split, kind, xray))
    return made


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


def _vqa_images(rng, count, ct_size):
    """Fresh phantom images for the VQA sets (not shared with the segmentation sources)."""
    images = []
    for i in range(count):
        if i % 2 == 0:
            task = phantoms.CT_TASKS[(i // 2) % 2]
            tumour = (i // 4) % 2 == 0
            ct = phantoms.generate_ct(rng, task, size=ct_size or 192, slices=9, tumours=3 if tumour else 0)
            area = (ct.label == 2).sum((1, 2)) if tumour else (ct.label > 0).sum((1, 2))
            z = int(area.argmax())
            has = bool((ct.label[z] == 2).sum() >= 20)
            images.append(("ct", phantoms.window_to_uint8(ct.hu[z]), {"organ": task, "tumour": has}))
        else:
            kind = phantoms.XRAY_CLASSES[(i // 2) % 3]
            xray = phantoms.generate_xray(rng, kind)
            side = int(np.argmax([xray.opacity[:, : xray.image.shape[1] // 2].sum(), xray.opacity[:, xray.image.shape[1] // 2:].sum()]))
            images.append(("xray", xray.image, {"class": kind, "side": side}))
    return images


def write_vqarad(out, count, rng, ct_size=None):
    """`VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/synpicN.jpg`; the last fifth are `test_freeform`."""
    root = Path(out) / "VQA_RAD"
    (root / "VQA_RAD Image Folder").mkdir(parents=True, exist_ok=True)
    rows, qid = [], 0
    for i, (kind, image, info) in enumerate(_vqa_images(rng, count, ct_size)):
        name = f"synpic{50000 + i}.jpg"
        Image.fromarray(image).save(root / "VQA_RAD Image Folder" / name, quality=92)
        phrase = "test_freeform" if i >= count * 0.8 else "freeform"
        for question, answer, answer_type, qtype in _vqa_items(rng, kind, info):
            qid += 1
            rows.append({"qid": qid, "phrase_type": phrase, "qid_linked_id": f"{i:05d}", "image_case_url": "",
                         "image_name": name, "image_organ": "ABD" if kind == "ct" else "CHEST", "evaluation": "given",
                         "question": question, "question_rephrase": "NULL", "question_relation": "NULL",
                         "question_frame": "NULL", "question_type": qtype, "answer": answer, "answer_type": answer_type})
    path = root / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_slake(out, count, rng, ct_size=None):
    """SLAKE layout: train.json / validate.json / test.json + imgs/xmlabN/source.jpg, with a few Chinese rows (q_lang zh)."""
    root = Path(out) / "SLAKE"
    splits = {"train": [], "validate": [], "test": []}
    qid = 0
    for i, (kind, image, info) in enumerate(_vqa_images(rng, count, ct_size)):
        folder = root / "imgs" / f"xmlab{i}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(folder / "source.jpg", quality=92)
        split = "test" if i >= count * 0.8 else "validate" if i >= count * 0.65 else "train"
        location = "Abdomen" if kind == "ct" else "Lung"
        modality = "CT" if kind == "ct" else "X-Ray"
        for question, answer, answer_type, qtype in _vqa_items(rng, kind, info):
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


def write_biomedparse(out, count, rng, ct_size=None):
    """BiomedParse-style Ref-Seg folder: `train|test/<case>_CT_abdomen.png` + one mask per target in
    `train_mask|test_mask/<case>_CT_abdomen_<target+words>.png` (liver, pancreas, spleen, kidney, tumours).
    The last fifth of the images go to test."""
    root = Path(out) / "BiomedParse"
    for i in range(count):
        task = phantoms.CT_TASKS[i % 2]
        ct = phantoms.generate_ct(rng, task, size=ct_size or 192, slices=7, tumours=int(rng.integers(0, 3)))
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
    return root


def write_phantoms(out, ct_volumes, xrays, seed=0, ct_size=None, ct_slices=None, xray_size=256, vqa_images=None,
                   refseg_images=None):
    """Everything `raddiagseg phantoms` writes. Returns a dict of the source paths for `build`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_liver = (ct_volumes + 1) // 2
    paths = {"msd": [], "covidqu": None, "vqarad": None, "slake": None, "refseg": None}
    for task, count in (("liver", n_liver), ("pancreas", ct_volumes - n_liver)):
        if count:
            write_msd(out, task, count, rng, size=ct_size, slices=ct_slices)
            paths["msd"].append(out / MSD_TASKS[task]["folder"])
    if xrays:
        write_covidqu(out / "COVID-QU-Ex", xrays, rng, size=xray_size)
        paths["covidqu"] = out / "COVID-QU-Ex"
    n_vqa = vqa_images if vqa_images is not None else max(10, (ct_volumes + xrays) // 3)
    if n_vqa:
        paths["vqarad"] = write_vqarad(out, n_vqa, rng, ct_size)
        paths["slake"] = write_slake(out, n_vqa, rng, ct_size)
    n_refseg = refseg_images if refseg_images is not None else max(6, ct_volumes)
    if n_refseg:
        paths["refseg"] = write_biomedparse(out, n_refseg, rng, ct_size)
    return paths
