"""A model's reference sample of its training distribution: replay rows for retraining and a fixed validation set.

Retraining on a few corrections alone makes a model forget what it knew; mixing in rows of its original training
distribution (replay) and comparing old and new model on a fixed validation set of that distribution guard
against it. A model folder says where its reference comes from in `reference.json`:

    {"replay":     {"phantoms": {"seed": 1234, "ct_volumes": 12, "xrays": 60, "ct_slices": 12},
                    "generator": "raddiagseg 0.1.0", "sha256": "..."},
     "validation": {"phantoms": {"seed": 98765, ...}, "generator": ..., "sha256": ...}}

Phantom parts are regenerated on demand (`build_phantom_dataset`, seconds) into a cache folder and checked
against the recorded digest of the files; a part may instead name a manifest and a split
(`{"manifest": "/data/raddiagseg-d/manifest.jsonl", "split": "train"}`), as `manifest_reference` writes for a
model trained on real data.
"""

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.json"
PARTS = ("replay", "validation")
# Demo-model sizes: enough replay rows for a 4:1 mix with a few corrected volumes, a validation set that scores in
# well under a minute on a 2-core CPU.
REPLAY_PHANTOMS = dict(ct_volumes=12, xrays=60, ct_slices=12)
VALIDATION_PHANTOMS = dict(ct_volumes=16, xrays=96, ct_slices=12)


@dataclass
class ReferenceSet:
    """One part of a reference, ready to read: `rows_of(manifest, split)` gives its rows."""

    part: str  # replay | validation
    manifest: Path
    split: Optional[str]  # None: every row of the manifest
    source: str  # what a person reads in train_stats
    warning: Optional[str] = None


def generator_version():
    import raddiagseg

    return f"raddiagseg {raddiagseg.__version__}"


def read_reference(model_dir):
    """The folder's reference.json as a dict, or None when it has none."""
    path = Path(model_dir) / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): fix or delete it") from None
    missing = [p for p in PARTS if not isinstance(spec.get(p), dict)]
    if missing:
        raise ValueError(f"{path} has no {' or '.join(missing)} part")
    return spec


def manifest_reference(manifest, replay_split="train", validation_split="val"):
    """A reference that reads an existing manifest (the data a model was trained on): train rows replayed, val rows validated."""
    manifest = str(Path(manifest).expanduser().resolve())
    return {"replay": {"manifest": manifest, "split": replay_split},
            "validation": {"manifest": manifest, "split": validation_split}}


def phantom_reference(train_seed, test_seed, cache_dir, variation="none"):
    """A phantom reference (replay from the training seed, validation from the held-out seed) with file digests;
    both of the training data's phantom `variation`, so replay and validation look like what the model saw."""
    spec = {}
    extra = {} if variation == "none" else {"variation": variation}  # version 1 entries keep their cache keys
    for part, seed, sizes in (("replay", train_seed, REPLAY_PHANTOMS), ("validation", test_seed, VALIDATION_PHANTOMS)):
        entry = {"phantoms": dict(sizes, seed=int(seed), **extra), "generator": generator_version()}
        folder = _build_phantoms(entry, Path(cache_dir))
        entry["sha256"] = folder_digest(folder)
        spec[part] = entry
    return spec


def write_reference(model_dir, spec):
    path = Path(model_dir) / REFERENCE_FILE
    path.write_text(json.dumps(spec, indent=1) + "\n")
    return path


def resolve(spec, cache_dir, parts=PARTS):
    """{part: ReferenceSet} for the `parts` of a reference dict, regenerating phantom parts into `cache_dir` when needed."""
    sets = {}
    for part in parts:
        entry = spec[part]
        if "manifest" in entry:
            manifest = Path(entry["manifest"]).expanduser()
            if manifest.is_dir():
                manifest = manifest / "manifest.jsonl"
            if not manifest.is_file():
                raise FileNotFoundError(f"reference {part} manifest {manifest} does not exist: fix reference_manifest")
            split = entry.get("split")
            sets[part] = ReferenceSet(part, manifest, split, f"{manifest} ({split or 'all'} rows)")
        elif "phantoms" in entry:
            folder = _build_phantoms(entry, Path(cache_dir))
            sizes = entry["phantoms"]
            source = (f"phantoms seed {sizes['seed']}: {sizes['ct_volumes']} CT volumes, {sizes['xrays']} X-rays "
                      f"({entry.get('generator', 'unknown generator')}, regenerated in {folder})")
            warning = None
            if entry.get("sha256") and folder_digest(folder) != entry["sha256"]:
                warning = (f"the regenerated {part} phantoms differ from those recorded with the model "
                           f"({entry.get('generator')} vs this {generator_version()}): both models are still compared "
                           "on the same rows, but they are not the model's own training distribution any more")
            sets[part] = ReferenceSet(part, folder / "manifest.jsonl", None, source, warning)
        else:
            raise ValueError(f"reference {part} names neither 'phantoms' nor 'manifest': {entry}")
    return sets


def folder_digest(folder):
    """sha256 over the built dataset's manifest, images and masks (not the generator's source files)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = [folder / "manifest.jsonl", *sorted((folder / "images").rglob("*")), *sorted((folder / "masks").rglob("*"))]
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _build_phantoms(entry, cache_dir):
    """The built phantom dataset of a reference part, in a cache folder named after its settings (built once)."""
    from raddiagseg.data.builder import build_phantom_dataset

    sizes = entry["phantoms"]
    key = hashlib.sha256(json.dumps(sizes, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir / f"phantoms-{sizes['seed']}-{key}"
    if (folder / "manifest.jsonl").is_file():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = cache_dir / f".tmp-{uuid.uuid4().hex}"
    log.info("regenerating reference phantoms %s into %s", sizes, folder)
    build_phantom_dataset(staging, ct_volumes=sizes["ct_volumes"], xrays=sizes["xrays"], seed=sizes["seed"],
                          ct_slices=sizes.get("ct_slices"), vqa_images=0, refseg_images=0, workers=1,
                          variation=sizes.get("variation", "none"))
    shutil.rmtree(staging / "sources", ignore_errors=True)
    try:
        os.replace(staging, folder)  # the folder appears complete or not at all
    except OSError:  # built meanwhile by another process
        shutil.rmtree(staging, ignore_errors=True)
    return folder
