"""PyTorch Dataset over a RadDiagSeg-D manifest, and a sampler that mixes tasks by ratio.

Why: the trainer needs training samples in the contract of docs/INTERFACES.md (image in [0, 1],
question, answer with seg tokens, one mask per token) with target synonyms sampled at load
time and augmentations applied jointly to image and masks; and a task mix (paper 001
fine-tuning: VQA-Seg 0.6 : VQA 0.4) that is reproducible across epochs and ranks.
"""

import logging
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from raddiagseg import imaging, templates, vocabulary
from raddiagseg.data import io
from raddiagseg.data.records import read_manifest

log = logging.getLogger(__name__)


def load_image(row, root):
    """The row's image as the model's float32 (H, W) input in [0, 1]: the app's view of the same file
    (`imaging.model_view`, so training, `predict` and the app feed the model the same array).

    HU slices (NIfTI, CT) are windowed with the row's `window`; 8-bit rasters (X-ray PNG, VQA
    images, Ref-Seg PNGs) are min-max scaled whatever their modality.
    """
    modality = "ct" if io.is_nifti(row["image"]) and row.get("modality") == "ct" else "xray"
    return imaging.read_slice_view(Path(root) / row["image"], modality).unit(0, row.get("window"))


def load_masks(row, root, shape=None):
    """The row's target masks (uint8 0/1, in target order), in the model's view as the image is; raises if one
    differs in shape from the image."""
    masks = []
    for target in row.get("targets", []):
        mask = (imaging.read_slice_view(Path(root) / target["mask"]).slices[0] > 0).astype(np.uint8)
        if shape is not None and mask.shape != tuple(shape):
            raise ValueError(f"mask {target['mask']} has shape {mask.shape}, image has {tuple(shape)}")
        masks.append(mask)
    return masks


AUGMENTATIONS = ("basic", "scanner")
MIRROR_PROB = 0.1  # "scanner" augmentation: chance of a left-right mirror (only for texts that name no side)
_SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def names_a_side(*texts):
    """Whether a question/answer says "left" or "right": mirroring such a sample would make its text wrong."""
    return any(_SIDE_WORDS.search(t or "") for t in texts)


def _invert(image):
    return 1.0 - image


def _augmenter(kind="basic", modality="ct"):
    """MONAI dictionary transforms applied jointly to image and masks (geometry) or to the image (intensity).

    "basic": a small affine warp and mild intensity changes, no flips (anatomy is lateralised).
    "scanner": the variation real studies show (phantoms generator version 2 draws the same kinds):
    in-plane rotation ±25° and zoom ±20 % (position, field of view, body size), contrast ×0.55-1.5 around the
    mean (contrast phase, window), gamma 0.45-2.4 (exposure), Gaussian smoothing or sharpening (reconstruction
    kernel, thick slices, detector blur), noise up to 0.08 of full range (≈ 30 HU in the CT window, 20 grey
    levels on an X-ray) and, for X-rays, inverted polarity. Mirroring is applied by the dataset (`MIRROR_PROB`),
    never to a sample whose text names a side.
    """
    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandGaussianNoised,
                                  RandGaussianSharpend, RandGaussianSmoothd, RandLambdad, RandScaleIntensityd,
                                  RandScaleIntensityFixedMeand, RandShiftIntensityd)

    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; expected one of {AUGMENTATIONS}")
    if kind == "scanner":
        steps = [
            RandAffined(keys=("image", "masks"), prob=0.8, rotate_range=0.44, scale_range=(0.2, 0.2),
                        translate_range=(16, 16), mode=("bilinear", "nearest"), padding_mode=("zeros", "zeros"),
                        allow_missing_keys=True),
            RandScaleIntensityFixedMeand(keys="image", factors=(-0.45, 0.5), prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.08, prob=0.5),
            RandAdjustContrastd(keys="image", gamma=(0.45, 2.4), prob=0.4),
            RandGaussianSmoothd(keys="image", sigma_x=(0.3, 1.5), sigma_y=(0.3, 1.5), prob=0.3),
            RandGaussianSharpend(keys="image", prob=0.2),
            RandGaussianNoised(keys="image", std=0.08, prob=0.5),
        ]
        if modality == "xray":
            steps.append(RandLambdad(keys="image", func=_invert, prob=0.15))
        return Compose(steps)
    return Compose([
        RandAffined(keys=("image", "masks"), prob=0.7, rotate_range=0.12, scale_range=(0.1, 0.1),
                    translate_range=(12, 12), mode=("bilinear", "nearest"), padding_mode=("border", "zeros"),
                    allow_missing_keys=True),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),
        RandGaussianNoised(keys="image", std=0.02, prob=0.4),
    ])


class ManifestDataset(Dataset):
    """Training samples from `manifest` (a manifest.jsonl or its folder) for one split and some tasks.

    synonym_prob: chance that each target is named by a random vocabulary synonym, written
    consistently into the question (refseg) and the answer. Randomness (synonyms, augmentation)
    is a pure function of (seed, epoch, index, visit), where visit counts how often this dataset
    object has served that index since the last `set_epoch`: repeated reads get fresh draws even
    when the caller never sets the epoch, and a fresh dataset replays the same sequence.
    """

    def __init__(self, manifest, split="train", tasks=None, augment=False, seed=0, synonym_prob=0.3, cot=False):
        """augment: False, True / "basic" (small warp, mild intensity) or "scanner" (see `_augmenter`)."""
        path = Path(manifest)
        self.manifest_path = path / "manifest.jsonl" if path.is_dir() else path
        self.root = self.manifest_path.parent
        rows = read_manifest(self.manifest_path)
        wanted = set(tasks) if tasks else None
        self.rows = [r for r in rows if (split is None or r["split"] == split) and (wanted is None or r["task"] in wanted)]
        self.split, self.augment, self.seed, self.synonym_prob = split, augment, seed, synonym_prob
        self.cot = cot  # vqaseg samples ask templates.COT_QUESTION and answer with reasoning (vqaseg_cot_answer)
        self.epoch = 0
        self._visits = {}
        self.augmentation = ("basic" if augment is True else augment) if augment else None
        self._transforms = {m: _augmenter(self.augmentation, m) for m in ("ct", "xray")} if augment else None

    def __len__(self):
        return len(self.rows)

    @property
    def tasks(self):
        """Task name of every index, for samplers."""
        return [r["task"] for r in self.rows]

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        self._visits = {}

    def __getitem__(self, index):
        row = self.rows[index]
        visit = self._visits.get(index, 0)
        self._visits[index] = visit + 1
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}:{visit}")
        image = load_image(row, self.root)
        masks = load_masks(row, self.root, image.shape)
        question, answer = self._texts(row, rng)
        if self._transforms is not None:
            mirror = (self.augmentation == "scanner" and not names_a_side(question, answer)
                      and rng.random() < MIRROR_PROB)
            image, masks = self._augment(image, masks, rng, row.get("modality"), mirror)
        return {"id": row["id"], "task": row["task"], "modality": row["modality"], "image": image,
                "question": question, "answer": answer, "masks": masks}

    def _texts(self, row, rng):
        if row["task"] == "refseg":
            label = vocabulary.sample_label(row["targets"][0]["name"], rng, self.synonym_prob)
            return templates.refseg_question(label, row["modality"]), templates.refseg_answer(label)
        if row["task"] == "reasonseg":  # a fresh description and wording per visit; the answer names the target
            target = row["targets"][0]
            descriptions = vocabulary.implicit_descriptions(target["name"]) or [row.get("description")]
            description = rng.choice(descriptions)
            question = templates.reasonseg_question(description, row["modality"], rng.randrange(len(templates.REASONSEG_QUESTIONS)))
            return question, templates.reasonseg_answer(description, vocabulary.sample_label(target["name"], rng, self.synonym_prob))
        if row["task"] == "vqaseg" and row.get("detection"):
            labels = [vocabulary.sample_label(t["name"], rng, self.synonym_prob) for t in row["targets"]]
            if self.cot:
                return templates.COT_QUESTION, templates.vqaseg_cot_answer(True, row["modality"], row["diagnosis"], labels)
            return row["question"], templates.vqaseg_answer(True, row["diagnosis"], labels)
        if row["task"] == "vqaseg" and self.cot:
            return templates.COT_QUESTION, templates.vqaseg_cot_answer(False, row["modality"])
        return row["question"], row["answer"]

    def _augment(self, image, masks, rng, modality, mirror=False):
        transform = self._transforms["xray" if modality == "xray" else "ct"]
        transform.set_random_state(seed=rng.randrange(2**31))
        if mirror:  # columns reversed: the image and its masks alike
            image, masks = image[:, ::-1].copy(), [m[:, ::-1].copy() for m in masks]
        data = {"image": image[None]}
        if masks:
            data["masks"] = np.stack(masks).astype(np.float32)
        out = transform(data)
        image = np.clip(np.asarray(torch.as_tensor(out["image"]))[0], 0.0, 1.0).astype(np.float32)
        if masks:
            masks = [(m > 0.5).astype(np.uint8) for m in np.asarray(torch.as_tensor(out["masks"]))]
        return image, masks


class TaskRatioSampler(Sampler):
    """Indices mixing tasks by `ratios`, the same order for the same (seed, epoch); rank r takes every world_size-th.

    Each task contributes round(ratio * num_samples) draws, cycling through fresh permutations of
    its samples (so every sample is seen before any repeats). Tasks in `ratios` that the dataset
    lacks are dropped and the rest renormalised, with a warning; tasks absent from `ratios` are
    not sampled.
    """

    def __init__(self, dataset, ratios=None, num_samples=None, seed=0, rank=0, world_size=1):
        ratios = dict(ratios or {"vqaseg": 0.6, "vqa": 0.4})
        tasks = dataset.tasks if hasattr(dataset, "tasks") else [dataset[i]["task"] for i in range(len(dataset))]
        self.by_task = {}
        for i, task in enumerate(tasks):
            self.by_task.setdefault(task, []).append(i)
        missing = [t for t in ratios if t not in self.by_task]
        if missing:
            log.warning("tasks %s are not in the dataset; their ratio is dropped and the rest renormalised", missing)
        ratios = {t: float(r) for t, r in ratios.items() if t in self.by_task and r > 0}
        if not ratios:
            raise ValueError(f"none of the requested tasks is in the dataset (it has {sorted(self.by_task)})")
        total = sum(ratios.values())
        self.ratios = {t: r / total for t, r in ratios.items()}
        self.num_samples = int(num_samples if num_samples is not None else len(tasks))
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def _counts(self):
        names = sorted(self.ratios)
        raw = [self.ratios[t] * self.num_samples for t in names]
        counts = [int(np.floor(x)) for x in raw]
        for i in np.argsort([-(x - np.floor(x)) for x in raw])[: self.num_samples - sum(counts)]:
            counts[i] += 1
        return dict(zip(names, counts))

    def global_order(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        picks = []
        for task, count in self._counts().items():
            pool = np.asarray(self.by_task[task])
            drawn = []
            while len(drawn) < count:
                drawn.extend(rng.permutation(pool).tolist())
            picks.extend(drawn[:count])
        return [picks[i] for i in rng.permutation(len(picks))]

    def __iter__(self):
        return iter(self.global_order()[self.rank::self.world_size])

    def __len__(self):
        return len(range(self.rank, self.num_samples, self.world_size))
