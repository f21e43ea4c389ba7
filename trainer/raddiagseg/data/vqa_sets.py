"""VQA-RAD and SLAKE question/answer files → `vqa` rows (answer_type closed/open).

VQA-RAD: one JSON list (`VQA_RAD Dataset Public.json`) next to `VQA_RAD Image Folder/`;
`phrase_type` starting with `test` marks the test set, 10 % of the other images (by image,
deterministic) become val. Its rows carry no modality, so it is inferred from the image's own
questions/answers (CT, MRI, X-ray words), else from `image_organ` (CHEST → xray, HEAD → mri,
ABD → ct). SLAKE: `train.json` / `validate.json` / `test.json` + `imgs/<img_name>`; English rows
only (`q_lang == "en"`, as paper 001). Images are stored as 8-bit grey PNG.
"""

import json
import logging
import re
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from raddiagseg.data import io
from raddiagseg.data.covidqu import safe_stem
from raddiagseg.data.records import assign_splits, vqa_row

log = logging.getLogger(__name__)

YES_NO = {"yes", "no"}
MODALITY_WORDS = (("mri", r"\b(mri|mr|t1|t2|flair|dwi|adc)\b"), ("ct", r"\b(ct|computed tomography|cta)\b"),
                  ("xray", r"\b(x-?ray|radiograph|xr|plain film|cxr)\b"))
ORGAN_MODALITY = {"CHEST": "xray", "HEAD": "mri", "ABD": "ct"}
SLAKE_MODALITY = {"ct": "ct", "mri": "mri", "x-ray": "xray", "xray": "xray"}


def _answer_type(raw, answer):
    kind = str(raw or "").strip().lower()
    if kind in ("closed", "open"):
        return kind
    return "closed" if answer.strip().lower() in YES_NO else "open"


def _copy_image(src, out, source, cache, report):
    """Store `src` once as 8-bit PNG under images/<source>/; None (and a report line) if unreadable."""
    if src in cache:
        return cache[src]
    rel = None
    try:
        array = io.read_slice(src)
        rel = f"images/{source}/{safe_stem(Path(src).parent.name + '_' + Path(src).name) if source == 'slake' else safe_stem(Path(src).name)}.png"
        io.write_png(Path(out) / rel, array)
    except (FileNotFoundError, ValueError) as exc:
        report.skip(src, str(exc))
        rel = None
    cache[src] = rel
    return rel


def _infer_modality(texts, organ):
    joined = " ".join(texts).lower()
    for modality, pattern in MODALITY_WORDS:
        if re.search(pattern, joined):
            return modality
    return ORGAN_MODALITY.get(str(organ).strip().upper(), "ct")


def convert_vqarad(json_path, out, report, seed=0):
    json_path = Path(json_path)
    if json_path.is_dir():
        json_path = json_path / "VQA_RAD Dataset Public.json"
    try:
        entries = json.loads(json_path.read_text())
    except FileNotFoundError:
        report.skip(json_path, "missing VQA-RAD JSON file")
        return []
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        report.skip(json_path, f"unreadable JSON: {exc}")
        return []
    if not isinstance(entries, list):
        report.skip(json_path, "expected a JSON list of question records")
        return []
    folder = json_path.parent / "VQA_RAD Image Folder"
    by_image = defaultdict(list)
    for entry in entries:
        if not isinstance(entry, dict) or not all(k in entry for k in ("image_name", "question", "answer")):
            report.skip(json_path, f"record without image_name/question/answer: {str(entry)[:80]}")
            continue
        by_image[entry["image_name"]].append(entry)
    train_images = [name for name, rows in by_image.items()
                    if not any(str(r.get("phrase_type", "")).startswith("test") for r in rows)]
    val_of = assign_splits(train_images, seed, "vqarad", fractions=(0.9, 0.1, 0.0))
    rows, cache = [], {}
    for name, entries_ in tqdm(sorted(by_image.items()), desc="vqarad", unit="img", leave=False):
        image_rel = _copy_image(folder / name, out, "vqarad", cache, report)
        if image_rel is None:
            continue
        texts = [f"{e['question']} {e['answer']}" for e in entries_]
        modality = _infer_modality(texts, entries_[0].get("image_organ"))
        for entry in entries_:
            test = str(entry.get("phrase_type", "")).startswith("test")
            answer = str(entry["answer"]).strip()
            base = {"id": f"vqarad_{entry.get('qid', len(rows))}", "source": "vqarad", "modality": modality,
                    "split": "test" if test else val_of.get(name, "train"), "image": image_rel, "window": None,
                    "volume": None, "slice": None}
            rows.append(vqa_row(base, str(entry["question"]).strip(), answer, _answer_type(entry.get("answer_type"), answer)))
    return rows


def convert_slake(directory, out, report):
    directory = Path(directory)
    rows, cache = [], {}
    found = False
    for filename, split in (("train.json", "train"), ("validate.json", "val"), ("test.json", "test")):
        path = directory / filename
        if not path.is_file():
            report.skip(path, "missing SLAKE split file")
            continue
        try:
            entries = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            report.skip(path, f"unreadable JSON: {exc}")
            continue
        found = True
        for entry in tqdm(entries, desc=f"slake {split}", unit="q", leave=False):
            if not isinstance(entry, dict) or entry.get("q_lang", "en") != "en":
                continue
            if not all(k in entry for k in ("img_name", "question", "answer")):
                report.skip(path, f"record without img_name/question/answer: {str(entry)[:80]}")
                continue
            image_rel = _copy_image(directory / "imgs" / entry["img_name"], out, "slake", cache, report)
            if image_rel is None:
                continue
            answer = str(entry["answer"]).strip()
            modality = SLAKE_MODALITY.get(str(entry.get("modality", "")).strip().lower(), "ct")
            base = {"id": f"slake_{entry.get('qid', len(rows))}", "source": "slake", "modality": modality, "split": split,
                    "image": image_rel, "window": None, "volume": None, "slice": None}
            rows.append(vqa_row(base, str(entry["question"]).strip(), answer, _answer_type(entry.get("answer_type"), answer)))
    if not found:
        log.warning("no SLAKE split files in %s", directory)
    return rows
