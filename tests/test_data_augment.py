"""Training-time "scanner" augmentation (issue 22): masks follow the image's geometry, mirroring never touches a text
that names a side, polarity flips only X-rays, and the "basic" recipe is what `augment=True` always was."""

import json

import numpy as np
import pytest

from raddiagseg import templates
from raddiagseg.data import io

SIZE = 128


def _manifest(tmp_path):
    """Three rows on one image with an object left of centre: a CT vqaseg, an X-ray vqaseg, a VQA row naming a side."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[40:90, 8:30] = 1
    mask[40:50, 30:44] = 1  # an L: any rotation or flip shows
    io.write_png(tmp_path / "img.png", mask * 200 + 20)
    io.write_png(tmp_path / "m.png", mask)
    target = [{"name": "lung", "role": "organ", "mask": "m.png"}]
    base = {"source": "t", "split": "train", "image": "img.png", "detection": True, "diagnosis": "COVID-19 infection",
            "question": templates.DEFAULT_QUESTION, "targets": target}
    rows = [
        {**base, "id": "ct", "task": "vqaseg", "modality": "ct", "answer": "x"},
        {**base, "id": "xray", "task": "vqaseg", "modality": "xray", "answer": "x"},
        {**base, "id": "side", "task": "vqa", "modality": "xray", "question": "Which lung is affected?",
         "answer": "Right", "targets": []},
    ]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return mask


def _draws(ds, index, n=60):
    for epoch in range(n):
        ds.set_epoch(epoch)
        yield ds[index]


def _object(image):
    """Where the object is: pixels far from the background level (either polarity)."""
    diff = np.abs(image - np.median(image))
    return diff > 0.5 * diff.max()


def test_scanner_augmentation_moves_masks_with_the_image_and_mirrors_only_side_free_texts(tmp_path):
    from raddiagseg.data.dataset import ManifestDataset

    mask = _manifest(tmp_path)
    ds = ManifestDataset(tmp_path, augment="scanner", synonym_prob=0.0)
    mirrored, changed = 0, 0
    for index in (0, 1):
        for sample in _draws(ds, index):
            aug = sample["masks"][0].astype(bool)
            seen = _object(sample["image"])
            dice = 2 * (aug & seen).sum() / (aug.sum() + seen.sum())
            assert dice > 0.85 and set(np.unique(sample["masks"][0])) <= {0, 1}
            assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
            cols = np.nonzero(aug)[1]
            mirrored += cols.mean() > SIZE / 2
            changed += not np.array_equal(aug, mask.astype(bool))
    assert changed >= 80 and 3 <= mirrored <= 30  # geometry moves in most draws (p 0.8); ~10 % are mirrored
    for sample in _draws(ds, 2):  # "Which lung is affected?": never mirrored, its object stays on the left
        assert np.nonzero(_object(sample["image"]))[1].mean() < SIZE / 2


def test_scanner_augmentation_inverts_polarity_of_xrays_only(tmp_path):
    from raddiagseg.data.dataset import ManifestDataset

    _manifest(tmp_path)
    ds = ManifestDataset(tmp_path, augment="scanner", synonym_prob=0.0)

    def inverted(sample):
        inside = sample["masks"][0].astype(bool)
        return sample["image"][inside].mean() < sample["image"][~inside].mean()

    assert not any(inverted(s) for s in _draws(ds, 0))
    assert 2 <= sum(inverted(s) for s in _draws(ds, 1)) <= 20


def test_basic_augmentation_is_the_default_recipe_and_never_mirrors(tmp_path):
    from raddiagseg.data.dataset import ManifestDataset
    from raddiagseg.training.config import TrainConfig

    _manifest(tmp_path)
    default, basic = (ManifestDataset(tmp_path, augment=a, synonym_prob=0.0) for a in (True, "basic"))
    for a, b in zip(_draws(default, 1, 10), _draws(basic, 1, 10)):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["masks"][0], b["masks"][0])
        assert np.nonzero(a["masks"][0])[1].mean() < SIZE / 2
    assert TrainConfig(data=str(tmp_path), out=str(tmp_path / "run")).augmentation == "basic"
    with pytest.raises(ValueError, match="--augmentation must be"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), augmentation="heavy").resolved()
    with pytest.raises(ValueError, match="unknown augmentation"):
        ManifestDataset(tmp_path, augment="heavy")
