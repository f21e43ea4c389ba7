"""A training manifest (docs/INTERFACES.md format) from the datastore's final labels and their label info.

Per corrected slice: one `vqaseg` sample (answer written with `templates.vqaseg_answer` from the
corrected detection / diagnosis and the segments that have voxels in that slice, organs first)
and one `refseg` sample per segment with voxels. 3D labels without a `slice` in their info give
a sample for every slice that has label voxels; such a slice is positive when the volume is and
an abnormality segment has voxels in it (or the volume's diagnosis has no abnormality mask).

A label that cannot be used (unreadable, wrong size, bad label info) is skipped with its reason and
the others are used; a segment whose name is not in the vocabulary is left out, the rest of its label used.

Validation: with at least `min_images_for_holdout` labelled images every 5th image (sorted ids)
is held out; with fewer, the training samples double as the validation set (`val_on_train`),
which only checks that the model learnt the corrections, not that it generalises.
"""

import json
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from raddiagseg import templates
from raddiagseg.data import io as data_io
from raddiagseg import imaging

from lib import image_io, label_info
from lib import segments as segment_specs

logger = logging.getLogger(__name__)

FINAL = "final"


def _safe(text):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:80]


def _write_image(path_base, array, modality):
    if modality == "xray":
        if array.dtype != np.uint8:
            low, high = float(array.min()), float(array.max())
            array = np.zeros_like(array, dtype=np.uint8) if high <= low else ((array - low) / (high - low) * 255).round()
        path = path_base.with_suffix(".png")
        data_io.write_png(path, array.astype(np.uint8))
    else:
        path = Path(str(path_base) + ".nii.gz")
        data_io.write_nifti_slice(path, np.asarray(array, dtype=np.float32), data_io.VIEW_SLICE_AFFINE)
    return path


def _slices(view, labels, info):
    """[(file slice index or None for a 2D image, image slice, label slice)] in the model's view."""
    label_volume = view.orientation.to_view(labels.reshape((-1, *labels.shape[-2:])))
    if len(view.file_shape) == 2:
        return [(None, view.slices[0], label_volume[0])]
    n = view.n_slices
    if info.slice is not None:
        if info.slice >= n:
            raise label_info.LabelInfoError(f"slice {info.slice} is outside the volume ({n} slices)")
        wanted = [info.slice]
    else:
        wanted = [k for k in range(n) if label_volume[view.view_index(k)].any()]
    return [(k, view.slices[view.view_index(k)], label_volume[view.view_index(k)]) for k in wanted]


def samples_for_image(image_id, image_path, label_path, info_dict, out_dir):
    """Manifest rows (without split) for one labelled image; files are written under out_dir."""
    info = label_info.parse(info_dict)
    image = image_io.read_image(image_path)
    try:
        labels_image = sitk.ReadImage(str(label_path))
    except RuntimeError:
        raise label_info.LabelInfoError(f"the label file {Path(label_path).name} could not be read "
                                        "(missing, not an image or corrupt)") from None
    if tuple(labels_image.GetSize()) != tuple(image.GetSize()) and not (  # a 2D label of a one-slice image fits
        tuple(labels_image.GetSize())[:2] == tuple(image.GetSize())[:2]
        and np.prod(labels_image.GetSize()) == np.prod(image.GetSize())
    ):
        raise label_info.LabelInfoError(f"label size {labels_image.GetSize()} differs from image size {image.GetSize()}")
    labels = np.asarray(sitk.GetArrayFromImage(labels_image)).reshape(tuple(reversed(image.GetSize())))
    if not info.segments and np.any(labels):
        if info.unknown:
            raise label_info.LabelInfoError(
                f"no segment name RadDiag knows ({', '.join(repr(name) for name, _ in info.unknown)}); "
                f"use one of {', '.join(segment_specs.label_names())} or a synonym")
        raise label_info.LabelInfoError("label info names no segments: send segments, label_names or label_info "
                                        "with the label")
    view = image_io.model_view(image, modality=info.modality)
    if view.modality not in label_info.MODALITIES:  # e.g. an ultrasound: its DICOM Modality is US
        raise label_info.LabelInfoError(
            f"the image is {view.modality.upper()} (its DICOM Modality), not a modality RadDiag trains on: send "
            f"label info modality ({', '.join(label_info.MODALITIES)}) to train on it as one")
    modality, window = view.modality, view.window_for()  # the window the app shows these slices with
    has_abnormality_segment = any(role == "abnormality" for _, _, role in info.segments)
    volume_detection = info.detection
    if volume_detection is None:
        volume_detection = bool(any(role == "abnormality" and (labels == v).any() for _, v, role in info.segments))

    rows = []
    for k, image2d, label2d in _slices(view, labels, info):
        present = [(name, value, role) for name, value, role in info.segments if (label2d == value).any()]
        present.sort(key=lambda s: 0 if s[2] == "organ" else 1)
        if info.slice is not None or image.GetDimension() == 2 or not has_abnormality_segment:
            detection = volume_detection
        else:
            detection = volume_detection and any(role == "abnormality" for _, _, role in present)
        stem = _safe(f"{image_id}_s{k}" if k is not None else image_id)
        if modality != "ct" and window:  # an X-ray's own window, applied here as `ModelView.unit` applies it
            image2d = imaging.to_unit_range(image2d, modality, window)
        image_file = _write_image(out_dir / "images" / stem, image2d, modality)
        base = {"source": "monailabel", "modality": modality, "image": str(image_file.relative_to(out_dir)),
                "window": list(window) if modality == "ct" else None, "volume": image_id, "slice": k}
        masks = {}
        for name, value, _ in present:
            masks[name] = _write_image(out_dir / "masks" / f"{stem}_{_safe(name)}", (label2d == value).astype(np.uint8), modality)
        if detection and not info.diagnosis:
            logger.warning("%s: positive label without a diagnosis: no vqaseg sample for slice %s", image_id, k)
        else:
            names = [name for name, _, _ in present] if detection else []
            rows.append({
                **base, "id": f"{stem}_vqaseg", "task": "vqaseg", "question": info.question,
                "answer": templates.vqaseg_answer(detection, info.diagnosis, names),
                "detection": bool(detection), "diagnosis": info.diagnosis if detection else None,
                "targets": [{"name": n, "role": r, "mask": str(masks[n].relative_to(out_dir))} for n, _, r in present]
                if detection else [],
            })
        for name, _, role in present:
            rows.append({
                **base, "id": f"{stem}_refseg_{_safe(name)}", "task": "refseg",
                "question": templates.refseg_question(name, modality), "answer": templates.refseg_answer(name),
                "detection": None, "diagnosis": None,
                "targets": [{"name": name, "role": role, "mask": str(masks[name].relative_to(out_dir))}],
            })
    return rows


def _label_path_function(datastore):
    """image id -> path of its final label as a NIfTI file.

    A DICOMweb datastore (Orthanc) keeps labels as DICOM SEG series on the server and a NIfTI copy
    (with the label info the client saved) in its local cache; its own ``get_label_uri`` wants the
    SEG series id, not the image id. So first pull every SEG into the cache (``datalist`` does that,
    converting to NIfTI), then read the cached copy by image id."""
    try:
        from monailabel.datastore.dicom import DICOMWebDatastore
        from monailabel.datastore.local import LocalDatastore
    except ImportError:  # pragma: no cover - dicomweb extras missing: only local datastores exist
        DICOMWebDatastore = None
    if DICOMWebDatastore is not None and isinstance(datastore, DICOMWebDatastore):
        datastore.datalist()
        return lambda image_id: LocalDatastore.get_label_uri(datastore, image_id, FINAL)
    return lambda image_id: datastore.get_label_uri(image_id, FINAL)


def build(datastore, out_dir, min_images_for_holdout=5):
    """Write out_dir/manifest.jsonl; returns a summary dict: counts, `skipped` (labels left out, with the
    reason: unreadable file, wrong size, unusable label info) and `skipped_segments` (segments whose
    name is not in the vocabulary; the rest of their label is used)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label_path = _label_path_function(datastore)
    image_ids = sorted(datastore.get_labeled_images(FINAL))
    holdout = len(image_ids) >= min_images_for_holdout
    rows, skipped, skipped_segments = [], [], []
    for index, image_id in enumerate(image_ids):
        try:
            info = datastore.get_label_info(image_id, FINAL) or {}
            image_rows = samples_for_image(image_id, datastore.get_image_uri(image_id), label_path(image_id), info,
                                           out_dir)
        except Exception as error:  # one bad label (info, file, size) must not stop training on the others
            expected = isinstance(error, (label_info.LabelInfoError, image_io.InputError))
            reason = str(error) if expected else f"{type(error).__name__}: {error}"
            skipped.append({"image": image_id, "reason": reason or type(error).__name__})
            logger.warning("Skipping the label of %s: %s", image_id, reason, exc_info=not expected)
            continue
        for entry in label_info.unknown_reasons(label_info.parse(info)):
            skipped_segments.append({"image": image_id, **entry})
            logger.warning("Label of %s: %s", image_id, entry["reason"])
        split = "val" if holdout and index % 5 == 4 else "train"
        rows += [{**row, "split": split} for row in image_rows]
    if not holdout:
        rows += [{**row, "id": row["id"] + "_val", "split": "val"} for row in rows]
    manifest = out_dir / "manifest.jsonl"
    with open(manifest, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return {
        "manifest": str(manifest),
        "images": len(image_ids) - len(skipped),
        "train_samples": sum(r["split"] == "train" for r in rows),
        "val_samples": sum(r["split"] == "val" for r in rows),
        "val_on_train": not holdout,
        "skipped": skipped,
        "skipped_segments": skipped_segments,
    }
