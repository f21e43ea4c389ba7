"""Domain guard: how far an image is from the model's own training images, so a model says "outside what I was
trained on" instead of diagnosing a photo, an MR or a real patient it has never seen anything like.

Why this design: the encoders the model runs anyway describe every image; a descriptor pooled from them (SAM
embedding mean/std per channel, projected CLIP token mean/std) plus the model input's intensity histogram and an
8x8 thumbnail costs no extra encoder pass. Per modality and per descriptor block the in-domain distribution is
summarised by a PCA (mean, top components and their variances, mean residual energy), i.e. a Mahalanobis distance
in the top components plus the distance off their subspace; the score of an image is the largest block score
(an image is only in domain when every block looks familiar). The threshold is a high quantile (default 0.995) of
the scores of held-out in-domain images (phantoms of seeds the model did not train on, or any held-out manifest).

Statistics live in the model folder (`domain_stats.safetensors`, written by `raddiagseg domain-stats`), so serving
needs no training data. A folder without them gets verdicts with `in_domain` None and a reason.

The modality check: the image is scored against the statistics of the modality it was read as (request param,
DICOM header or intensities); a modality the model has no statistics for (e.g. MR for a CT/X-ray model) is out of
domain, and an image that the encoders place among the *other* modality's training images is flagged as such.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raddiagseg.fileio import atomic_write

STATS_FILE = "domain_stats.safetensors"
FORMAT_VERSION = 1
DEFAULT_QUANTILE = 0.995
COMPONENTS = 8  # principal components per descriptor block
HIST_BINS = 16
THUMB = 8  # thumbnail side
BLOCKS = ("vision", "clip", "pixels")
MODALITY_TITLES = {"ct": "CT", "xray": "chest X-ray", "mri": "MR"}
PHANTOMS_TRAINED_ON = "synthetic phantoms only (CT slices of liver/pancreas volumes and chest X-rays, `raddiagseg phantoms`)"
SOURCE_TITLES = {"param": "the request's modality", "dicom": "the DICOM header", "intensities": "its intensities"}


def _thumbnail(image):
    """THUMB x THUMB block means of an (H, W) image (edges cropped to a multiple of THUMB)."""
    h, w = (s // THUMB * THUMB for s in image.shape)
    if h == 0 or w == 0:
        return np.zeros(THUMB * THUMB, np.float32)
    return image[:h, :w].reshape(THUMB, h // THUMB, THUMB, w // THUMB).mean(axis=(1, 3)).ravel()


def descriptors(features, unit_images):
    """{block: (B, D) float32} for a batch: `features` an ImageFeatures (or a list of one-image ones) of the
    model inputs `unit_images` ((H, W) arrays in [0, 1])."""
    if isinstance(features, (list, tuple)):
        features = type(features[0]).cat(features) if len(features) > 1 else features[0]
    vision = features.vision.detach().float().cpu()
    clip = features.image_embeds.detach().float().cpu()
    vision = vision.flatten(2)  # (B, C, h*w)
    out = {
        "vision": np.concatenate([vision.mean(2).numpy(), vision.std(2).numpy()], axis=1),
        "clip": np.concatenate([clip.mean(1).numpy(), clip.std(1).numpy()], axis=1),
    }
    pixels = []
    for image in unit_images:
        image = np.asarray(image, np.float32)
        hist = np.histogram(np.clip(image, 0, 1), bins=HIST_BINS, range=(0, 1))[0] / max(image.size, 1)
        pixels.append(np.concatenate([hist, _thumbnail(image)]))
    out["pixels"] = np.asarray(pixels, np.float32).reshape(len(unit_images), HIST_BINS + THUMB * THUMB)
    return {k: v.astype(np.float32) for k, v in out.items()}


@dataclass
class BlockStats:
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,) per-feature std (standardisation)
    components: np.ndarray  # (k, D) orthonormal rows
    variances: np.ndarray  # (k,)
    residual: float  # mean squared distance off the component subspace (in-domain)

    @classmethod
    def fit(cls, x, k=COMPONENTS):
        x = np.asarray(x, np.float64)
        mean = x.mean(0)
        scale = x.std(0) + 1e-3 * (x.std(0).mean() + 1e-8)  # no division by ~0 for constant features
        z = (x - mean) / scale
        k = int(min(k, max(1, x.shape[0] - 1), x.shape[1]))
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        variances = s[:k] ** 2 / max(x.shape[0] - 1, 1) + 1e-6
        projected = z @ vt[:k].T
        residual = float(np.mean(np.sum(z**2, 1) - np.sum(projected**2, 1))) + 1e-6
        return cls(mean, scale, vt[:k], variances, residual)

    def score(self, x):
        """Root mean squared standardised distance: about 1 for in-domain images, large for strange ones."""
        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        projected = z @ self.components.T
        inside = np.sum(projected**2 / self.variances, 1)
        off = np.maximum(np.sum(z**2, 1) - np.sum(projected**2, 1), 0.0) / self.residual
        return np.sqrt((inside + off) / (len(self.variances) + 1))


class DomainStats:
    """Per modality: BlockStats for each descriptor block and the calibrated threshold."""

    def __init__(self, blocks, thresholds, meta=None):
        self.blocks = blocks  # {modality: {block: BlockStats}}
        self.thresholds = thresholds  # {modality: float}
        self.meta = dict(meta or {})

    @property
    def modalities(self):
        return sorted(self.blocks)

    @classmethod
    def fit(cls, fit_descriptors, k=COMPONENTS, meta=None):
        """Statistics from {modality: {block: (N, D)}} of in-domain images; thresholds left for `calibrate`."""
        blocks = {m: {b: BlockStats.fit(d[b], k) for b in BLOCKS} for m, d in fit_descriptors.items()}
        return cls(blocks, {m: float("inf") for m in blocks}, meta)

    def scores(self, descriptor, modality):
        """(N,) scores of {block: (N, D)} against `modality`'s statistics: the largest block score."""
        return np.max([self.blocks[modality][b].score(descriptor[b]) for b in BLOCKS], axis=0)

    def calibrate(self, held_out_descriptors, quantile=DEFAULT_QUANTILE):
        """Thresholds = `quantile` of the scores of held-out in-domain images of each modality."""
        for modality, d in held_out_descriptors.items():
            self.thresholds[modality] = float(np.quantile(self.scores(d, modality), quantile))
        self.meta["quantile"] = quantile

    # --- files ---------------------------------------------------------------------------
    def save(self, folder):
        from safetensors.numpy import save_file

        tensors = {}
        for modality, blocks in self.blocks.items():
            for name, s in blocks.items():
                prefix = f"{modality}.{name}."
                tensors[prefix + "mean"] = s.mean.astype(np.float32)
                tensors[prefix + "scale"] = s.scale.astype(np.float32)
                tensors[prefix + "components"] = s.components.astype(np.float32)
                tensors[prefix + "variances"] = s.variances.astype(np.float32)
                tensors[prefix + "residual"] = np.array([s.residual], np.float32)
        meta = {**self.meta, "format_version": FORMAT_VERSION, "thresholds": self.thresholds, "blocks": list(BLOCKS)}
        return atomic_write(Path(folder) / STATS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"domain": json.dumps(meta)}))

    @classmethod
    def load(cls, folder):
        """The statistics in a model folder, or None when it has none."""
        from safetensors import safe_open

        path = Path(folder) / STATS_FILE
        if not path.is_file():
            return None
        with safe_open(str(path), "np") as f:
            meta = json.loads((f.metadata() or {}).get("domain", "{}"))
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: domain statistics format {meta.get('format_version')!r}, "
                                 f"expected {FORMAT_VERSION}; rerun `raddiagseg domain-stats`")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        blocks = {}
        for modality in meta["thresholds"]:
            blocks[modality] = {
                name: BlockStats(*(tensors[f"{modality}.{name}.{part}"].astype(np.float64)
                                   for part in ("mean", "scale", "components", "variances")),
                                 float(tensors[f"{modality}.{name}.residual"][0]))
                for name in BLOCKS
            }
        thresholds = {m: float(t) for m, t in meta.pop("thresholds").items()}
        return cls(blocks, thresholds, meta)


def model_identity(folder, stats=None):
    """{name, trained_on, clinical_use (always False: research software, not a medical device), notice (the sentence
    clients show)} of the model in `folder`, said in every answer and in /info/."""
    folder = Path(folder)
    trained_on = (stats.meta.get("trained_on") if stats is not None else None) or \
        "data not recorded (the model folder has no domain statistics)"
    return {"name": folder.name, "trained_on": trained_on, "clinical_use": False,
            "notice": f"Answered by {folder.name}: trained on {trained_on}, not for clinical use"}


def _title(modality):
    return MODALITY_TITLES.get(modality, modality.upper())  # another DICOM Modality as its code: US, NM, OT


class DomainGuard:
    """Verdicts for images a model is asked about: {"in_domain", "score", "threshold", "reason"}."""

    def __init__(self, stats, folder=None):
        self.stats = stats
        self.folder = Path(folder) if folder is not None else None
        self.model_name = self.folder.name if self.folder is not None else "this model"

    @classmethod
    def for_model_dir(cls, folder):
        return cls(DomainStats.load(folder) if folder is not None else None, folder)

    def identity(self):
        """{name, trained_on, clinical_use} of the guarded model."""
        return model_identity(self.folder or Path(self.model_name), self.stats)

    def scores_modality(self, modality):
        """Whether a verdict on an image read as `modality` needs its features: False when the model has statistics
        and none for that modality (refused as it is, e.g. an MR or a US for a CT/X-ray model)."""
        return self.stats is None or modality in self.stats.modalities

    def check(self, features, unit_images, modality, source="intensities"):
        """One verdict per image; `modality` ("ct" | "xray" | "mri") is how the image was read, `source` why."""
        n = len(unit_images)
        if self.stats is None:
            reason = (f"no domain statistics in model folder {self.model_name} ({STATS_FILE}); "
                      "run `raddiagseg domain-stats --model DIR` to write them")
            return [{"in_domain": None, "score": None, "threshold": None, "reason": reason}] * n
        trained = self.stats.modalities
        how = SOURCE_TITLES.get(source, source)
        if modality not in trained:
            reason = (f"the image is {_title(modality)} (from {how}); this model was trained on "
                      f"{' and '.join(_title(m) for m in trained)} images only")
            if modality not in MODALITY_TITLES:  # e.g. a chest film scanned as OT: the user may know better
                reason += f" (send modality {' or '.join(trained)} to read it as one of those)"
            return [{"in_domain": False, "score": None, "threshold": None, "reason": reason}] * n
        descriptor = descriptors(features, unit_images)
        scores = {m: self.stats.scores(descriptor, m) for m in trained}
        threshold = self.stats.thresholds[modality]
        verdicts = []
        for i in range(n):
            score = float(scores[modality][i])
            entry = {"in_domain": bool(score <= threshold), "score": round(score, 4), "threshold": round(threshold, 4)}
            if entry["in_domain"]:
                entry["reason"] = (f"the image is close to the model's {_title(modality)} training images "
                                   f"(score {score:.2f} <= threshold {threshold:.2f})")
            else:
                like = [m for m in trained if m != modality and scores[m][i] <= self.stats.thresholds[m]]
                if like:
                    entry["reason"] = (f"the model's image encoders see a {_title(like[0])}, but the image was read as "
                                       f"{_title(modality)} (from {how})")
                else:
                    entry["reason"] = (f"the image is unlike the model's {_title(modality)} training images "
                                       f"(score {score:.2f} > threshold {threshold:.2f})")
            verdicts.append(entry)
        return verdicts


# --- statistics from data ------------------------------------------------------------------
def manifest_descriptors(model, manifest, batch_size=16, max_per_modality=None, split=None):
    """{modality: {block: (N, D)}} of the distinct CT / X-ray images of a manifest (of one `split`, or all rows),
    fed as `raddiagseg predict` feeds them (`evaluation.predict.sample_image`)."""
    import torch

    from raddiagseg.data.records import read_manifest
    from raddiagseg.evaluation.predict import sample_image

    rows, seen = {}, set()
    for row in read_manifest(manifest, split, base=True):
        modality = row.get("modality")
        if modality not in ("ct", "xray") or not row.get("image") or row["image"] in seen:
            continue
        seen.add(row["image"])
        rows.setdefault(modality, []).append(row)
    out = {}
    with torch.inference_mode():
        for modality, items in rows.items():
            items = items[:max_per_modality] if max_per_modality else items
            parts = []
            for start in range(0, len(items), batch_size):
                images = [sample_image(row) for row in items[start:start + batch_size]]
                parts.append(descriptors(model.encode_images(images), images))
            out[modality] = {b: np.concatenate([p[b] for p in parts]) for b in BLOCKS}
    return out


def phantom_manifest(work, seed, ct_volumes, xrays, ct_slices=12, workers=None, variation="none"):
    """A built manifest of CT volumes and chest X-rays (the segmentation sources only) of phantom seed `seed`."""
    from raddiagseg.data.builder import build_dataset
    from raddiagseg.evaluation.robustness import write_sources

    work = Path(work) / (f"seed{seed}" if variation == "none" else f"seed{seed}-{variation}")
    manifest = work / "manifest.jsonl"
    if not manifest.is_file():
        paths = write_sources(work / "sources", seed, ct_volumes, xrays, ct_slices, variation=variation, workers=workers)
        rows, report = build_dataset(work, msd=paths["msd"], covidqu=paths["covidqu"], seed=seed)
        if not rows:
            raise ValueError(f"no samples built from phantoms of seed {seed}: {report.summary()}")
    return manifest


def _pooled(parts):
    """{modality: {block: (N, D)}} of several manifest_descriptors results, concatenated."""
    return {m: {b: np.concatenate([p[m][b] for p in parts if m in p]) for b in BLOCKS}
            for m in sorted({m for p in parts for m in p})}


def write_stats(model, folder, fit_manifest, calib_manifests, quantile=DEFAULT_QUANTILE, components=COMPONENTS,
                batch_size=16, meta=None):
    """Fit on `fit_manifest`'s images, calibrate on those of `calib_manifests` (held out, pooled), save in `folder`;
    returns (DomainStats, {modality: share of the calibration images in domain}).

    Slices of one volume are alike, so the quantile's tail is set by whole volumes: calibrate on many volumes."""
    fit = manifest_descriptors(model, fit_manifest, batch_size)
    held_out = _pooled([manifest_descriptors(model, m, batch_size) for m in calib_manifests])
    missing = sorted(set(fit) ^ set(held_out))
    if not fit or missing:
        raise ValueError(f"fit and calibration data must hold the same modalities (ct/xray); got {sorted(fit)} "
                         f"and {sorted(held_out)}")
    counts = {m: {"fit": int(len(fit[m]["pixels"])), "calibration": int(len(held_out[m]["pixels"]))} for m in fit}
    stats = DomainStats.fit(fit, components, {**(meta or {}), "images": counts, "components": components})
    stats.calibrate(held_out, quantile)
    stats.save(folder)
    rates = {m: float(np.mean(stats.scores(held_out[m], m) <= stats.thresholds[m])) for m in held_out}
    return stats, rates


DESCRIPTOR_PARTS = ("vision", "clip", "projector")  # `set_trainable` flags of what the descriptors are computed by


def finetuned_stats(model, folder, served_folder, corrections, reference=(), batch_size=16):
    """Domain statistics for a model fine-tuned (in `folder`) from the model in `served_folder`, so a retrained
    model is guarded as its parent was and says what it was trained on; returns a summary dict, or None when the
    parent had no statistics.

    The parent's statistics are carried over: fitted on many images, they describe the training distribution
    better than a refit on the few images at hand would (a PCA of a few volumes scores held-out slices of the
    same distribution far out and ends with a loose threshold). When fine-tuning changed a part the descriptors
    come from (`DESCRIPTOR_PARTS`), the new model's scores of the `reference` images ([(manifest, split)]: the
    parent's training distribution and held-out set, as the train task's replay and gate use them) recalibrate
    each threshold at the parent's quantile, never below the parent's threshold; without reference images they
    are carried over unchecked (a drift then refuses in-domain images, which `force` answers, rather than letting
    real ones through)."""
    served = DomainStats.load(served_folder)
    if served is None:
        return None
    trained_on = f"{served.meta.get('trained_on') or 'data not recorded'}; fine-tuned on {corrections}"
    stats = DomainStats(served.blocks, dict(served.thresholds),
                        {**served.meta, "trained_on": trained_on, "finetuned_from": Path(served_folder).name})
    summary = {"trained_on": trained_on}
    trainable = model.config.trainable
    if not any(getattr(trainable, part) for part in DESCRIPTOR_PARTS):
        summary["method"] = "carried over (the image encoders and projector did not train)"
    elif not reference:
        summary["method"] = "carried over unchecked (the image encoders trained; no reference images to check on)"
    else:
        quantile = served.meta.get("quantile", DEFAULT_QUANTILE)
        images = _pooled([manifest_descriptors(model, m, batch_size, split=split) for m, split in reference])
        summary["reference_in_domain_at_parent_threshold"] = {}
        for modality, descriptor in images.items():
            if modality not in stats.thresholds:
                continue
            scores = stats.scores(descriptor, modality)
            parent = served.thresholds[modality]
            summary["reference_in_domain_at_parent_threshold"][modality] = round(float(np.mean(scores <= parent)), 4)
            stats.thresholds[modality] = max(parent, float(np.quantile(scores, quantile)))
        stats.meta["recalibrated_on"] = ", ".join(f"{m} ({s or 'all rows'})" for m, s in reference)
        summary["method"] = ("carried over; thresholds recalibrated on the new model's scores of the reference "
                             "images (never below the parent's)")
    stats.save(folder)
    summary["thresholds"] = {m: round(t, 4) for m, t in stats.thresholds.items()}
    return summary


def register(subparsers):
    p = subparsers.add_parser(
        "domain-stats",
        help="write the domain guard's statistics (domain_stats.safetensors) into a model folder",
        description="Describe in-domain images with the model's own encoders, fit per-modality statistics and\n"
        "calibrate the threshold on held-out images; the app then flags images outside the model's domain.\n"
        "Data: --fit-data/--calib-data manifests (e.g. the training and validation manifests of a model trained\n"
        "on real data), else phantoms of --fit-seed (the demo model's training seed) and --calib-seed (unseen).",
    )
    p.add_argument("--model", required=True, type=Path, help="model folder (save_pretrained); the stats are written there")
    p.add_argument("--fit-data", type=Path, default=None, help="manifest of the model's training images")
    p.add_argument("--calib-data", type=Path, nargs="+", default=None, help="manifest(s) of held-out in-domain images")
    p.add_argument("--fit-seed", type=int, default=1234, help="phantom seed of the fit images (default 1234)")
    p.add_argument("--calib-seed", type=int, nargs="+", default=[2718, 2719],
                   help="phantom seed(s) of the calibration images, each half as many as the fit (default 2718 2719)")
    p.add_argument("--ct-volumes", type=int, default=80, help="phantom CT volumes to fit on")
    p.add_argument("--xrays", type=int, default=600, help="phantom X-rays to fit on")
    p.add_argument("--work", type=Path, default=None, help="folder for the phantoms (default: a temporary one)")
    p.add_argument("--variation", choices=("none", "scanner", "mixed"), default="none",
                   help="phantom variation of the fit and calibration phantoms: the model's training data's")
    p.add_argument("--trained-on", default=None,
                   help="what the model was trained on, said in every answer (default for phantoms: synthetic phantoms only)")
    p.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE, help="threshold quantile (default 0.995)")
    p.add_argument("--components", type=int, default=COMPONENTS, help="principal components per descriptor block")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=run_domain_stats)


def run_domain_stats(args):
    import tempfile

    from raddiagseg.cli import CommandError
    from raddiagseg.evaluation.predict import model_from

    if not (args.model / "config.json").is_file():
        raise CommandError(f"{args.model} is not a model folder (no config.json)")
    if not 0.5 <= args.quantile < 1:
        raise CommandError(f"--quantile must be in [0.5, 1), got {args.quantile}")
    if (args.fit_data is None) != (args.calib_data is None):
        raise CommandError("give both --fit-data and --calib-data, or neither (phantoms)")
    model = model_from(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        if args.fit_data is None:
            work = args.work or Path(tmp)
            fit = phantom_manifest(work, args.fit_seed, args.ct_volumes, args.xrays, variation=args.variation)
            calib = [phantom_manifest(work, seed, max(1, args.ct_volumes // 2), max(1, args.xrays // 2),
                                      variation=args.variation) for seed in args.calib_seed]
            meta = {"data": "phantoms", "fit_seed": args.fit_seed, "calibration_seed": args.calib_seed,
                    "variation": args.variation,
                    "trained_on": args.trained_on or PHANTOMS_TRAINED_ON}
        else:
            fit, calib = args.fit_data, args.calib_data
            meta = {"data": "manifests", "fit": str(fit), "calibration": ", ".join(str(c) for c in calib),
                    "trained_on": args.trained_on or f"the images of {fit.name} (not recorded further)"}
        stats, rates = write_stats(model, args.model, fit, calib, args.quantile, args.components, args.batch_size, meta)
    for modality in stats.modalities:
        print(f"{modality}: threshold {stats.thresholds[modality]:.3f} ({args.quantile} quantile of "
              f"{stats.meta['images'][modality]['calibration']} held-out images, {rates[modality]:.1%} in domain), "
              f"fitted on {stats.meta['images'][modality]['fit']}")
    print(f"wrote {args.model / STATS_FILE}")
    return 0


def card_section(folder):
    """The model card's "Domain" section, from the statistics in `folder` (or saying they are missing)."""
    stats = DomainStats.load(folder)
    identity = model_identity(folder, stats)
    lines = ["## Domain", "", f"- Trained on: {identity['trained_on']}.",
             "- Use: not for clinical use (research software, not a medical device).",
             "- The app's domain guard (`raddiagseg.domain`, statistics in `domain_stats.safetensors`) refuses to "
             "diagnose images unlike the training images (answer with `force: true` to override; still flagged)."]
    if stats is None:
        lines.append("- This folder has no domain statistics: every answer says `in_domain: null`; run "
                     "`raddiagseg domain-stats --model DIR`.")
        return "\n".join(lines) + "\n"
    seeds = stats.meta.get("calibration_seed")
    seeds = ", ".join(str(s) for s in seeds) if isinstance(seeds, list) else seeds
    variation = stats.meta.get("variation", "none")
    source = (f"phantoms (variation {variation}) of seed {stats.meta.get('fit_seed')} (fit) and unseen seed(s) {seeds} "
              "(calibration)" if stats.meta.get("data") == "phantoms" else
              f"{stats.meta.get('fit')} (fit) and {stats.meta.get('calibration')} (calibration)")
    lines.append(f"- Statistics from {source}; threshold = {stats.meta.get('quantile')} quantile of the calibration "
                 "images' scores:")
    lines += ["", "| modality | fit images | calibration images | threshold |", "|---|---|---|---|"]
    for m in stats.modalities:
        counts = stats.meta.get("images", {}).get(m, {})
        lines.append(f"| {_title(m)} | {counts.get('fit')} | {counts.get('calibration')} | {stats.thresholds[m]:.3f} |")
    lines += ["", f"- Images of another modality ({', '.join(t for m, t in MODALITY_TITLES.items() if m not in stats.blocks)})"
              " are out of domain."]
    return "\n".join(lines) + "\n"
