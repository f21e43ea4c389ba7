"""Acceptance of the data part: a fresh phantom run builds all three tasks with a leak-free split,
correct positives/negatives and masks, and the Dataset/sampler serve the training contract."""

import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from raddiagseg import templates, vocabulary
from raddiagseg.data import io
from raddiagseg.data.builder import build_dataset
from raddiagseg.data.layouts import write_phantoms
from raddiagseg.data.records import read_manifest

REQUIRED = {"id", "task", "source", "modality", "split", "image", "question", "answer", "detection", "diagnosis", "targets"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """8 CT volumes (reduced size) + 60 X-rays + small VQA sets, built once for this module."""
    root = tmp_path_factory.mktemp("phantom_build")
    paths = write_phantoms(root / "src", ct_volumes=8, xrays=60, seed=3, ct_size=128, ct_slices=16, xray_size=128,
                           vqa_images=10, refseg_images=6)
    out = root / "built"
    rows, report = build_dataset(out, msd=paths["msd"], covidqu=paths["covidqu"], vqarad=paths["vqarad"],
                                 slake=paths["slake"], refseg=paths["refseg"], seed=0)
    return {"out": out, "rows": rows, "report": report, "paths": paths}


def test_build_writes_all_three_tasks_with_contract_fields(built):
    rows = read_manifest(built["out"] / "manifest.jsonl")
    assert rows == built["rows"]
    assert built["report"].skipped == []
    assert {r["task"] for r in rows} == {"vqaseg", "refseg", "vqa"}
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert REQUIRED <= set(row), row["id"]
        assert row["modality"] in ("ct", "xray", "mri") and row["split"] in ("train", "val", "test")
        assert not Path(row["image"]).is_absolute() and (built["out"] / row["image"]).is_file()
        if row["source"].startswith("msd_"):
            assert row["window"] == [40.0, 400.0] and row["volume"] and isinstance(row["slice"], int)
        if row["task"] == "vqa":
            assert row["answer_type"] in ("closed", "open") and row["targets"] == []
        if row["task"] == "refseg":
            (target,) = row["targets"]
            assert row["answer"] == templates.refseg_answer(target["name"])
    refseg_targets = {r["targets"][0]["name"] for r in rows if r["source"] == "refseg"}
    assert {"liver", "pancreas", "spleen", "kidney"} <= refseg_targets  # BiomedParse-style folder, other organs too
    vqa_sources = Counter(r["source"] for r in rows if r["task"] == "vqa")
    assert set(vqa_sources) == {"vqarad", "slake"}
    slake_questions = [r["question"] for r in rows if r["source"] == "slake"]
    assert all(q.isascii() for q in slake_questions)  # the Chinese rows are left out


def test_no_volume_crosses_splits_and_every_split_has_ct_positives(built):
    splits = {}
    for row in built["rows"]:
        if row.get("volume"):
            splits.setdefault(row["volume"], set()).add(row["split"])
    assert len(splits) == 8
    assert all(len(s) == 1 for s in splits.values())
    ct_positive_splits = {r["split"] for r in built["rows"] if r["task"] == "vqaseg" and r["modality"] == "ct" and r["detection"]}
    assert ct_positive_splits == {"train", "val", "test"}


def test_positives_have_organ_and_touching_abnormality_masks_negatives_none(built):
    out, checked = built["out"], Counter()
    for row in (r for r in built["rows"] if r["task"] == "vqaseg"):
        image = io.read_slice(out / row["image"])
        if not row["detection"]:
            assert row["answer"] == templates.NEGATIVE_ANSWER and row["targets"] == [] and row["diagnosis"] is None
            checked["negative"] += 1
            continue
        names = [t["name"] for t in row["targets"]]
        assert row["answer"] == templates.vqaseg_answer(True, row["diagnosis"], names)
        masks = {t["role"]: io.read_slice(out / t["mask"]) for t in row["targets"]}
        for mask in masks.values():
            assert mask.shape == image.shape and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        if row["diagnosis"] == "Non-COVID infection":
            assert names == ["lung"]
        else:
            organ, abnormality = masks["organ"], masks["abnormality"]
            assert [t["role"] for t in row["targets"]] == ["organ", "abnormality"]
            assert (abnormality & ~ndimage.binary_dilation(organ, iterations=1)).sum() == 0
        checked[row["diagnosis"]] += 1
    assert set(checked) == {"negative", "Liver tumour", "Pancreas tumour", "COVID-19 infection", "Non-COVID infection"}


def test_ct_slices_are_hu_nifti_and_xrays_8bit_png(built):
    rows = built["rows"]
    ct = next(r for r in rows if r["modality"] == "ct" and r["task"] == "vqaseg")
    hu = io.read_slice(built["out"] / ct["image"])
    assert ct["image"].endswith(".nii.gz") and hu.dtype == np.int16 and hu.min() < -500 and hu.max() > 300
    xr = next(r for r in rows if r["modality"] == "xray")
    assert xr["image"].endswith(".png") and io.read_slice(built["out"] / xr["image"]).dtype == np.uint8


def test_dataset_returns_training_samples(built):
    from raddiagseg.data.dataset import ManifestDataset

    ds = ManifestDataset(built["out"] / "manifest.jsonl", split="train", synonym_prob=0.0)
    assert len(ds) == sum(r["split"] == "train" for r in built["rows"])
    for task in ("vqaseg", "refseg", "vqa"):
        index = next(i for i, r in enumerate(ds.rows) if r["task"] == task and (task != "vqaseg" or r["detection"]))
        sample = ds[index]
        assert set(sample) == {"id", "task", "modality", "image", "question", "answer", "masks"}
        assert sample["image"].dtype == np.float32 and sample["image"].ndim == 2
        assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
        assert len(sample["masks"]) == sum(sample["answer"].count(t) for t in templates.SEG_TOKENS)
        assert all(m.shape == sample["image"].shape and m.dtype == np.uint8 and m.any() for m in sample["masks"])
        assert sample["answer"] == ds.rows[index]["answer"]  # no synonyms asked for


def test_synonyms_are_sampled_consistently_in_question_and_answer(built):
    from raddiagseg.data.dataset import ManifestDataset

    ds = ManifestDataset(built["out"], split="train", tasks=["refseg", "vqaseg"], synonym_prob=1.0, seed=1)
    ref = next(i for i, r in enumerate(ds.rows) if r["task"] == "refseg" and r["targets"][0]["name"] == "liver")
    sample = ds[ref]
    label = sample["answer"][len("Here is the mask for "):-len(" <seg000>.")]
    assert label in vocabulary.target_names("liver")[1:]
    assert sample["question"] == templates.refseg_question(label, "ct")
    again = ManifestDataset(built["out"], split="train", tasks=["refseg", "vqaseg"], synonym_prob=1.0, seed=1)
    assert again[ref]["answer"] == sample["answer"]  # a fresh dataset replays the same draws
    assert len({ds[ref]["answer"] for _ in range(8)}) > 1  # repeated reads draw new synonyms
    pos = next(i for i, r in enumerate(ds.rows) if r["task"] == "vqaseg" and r["detection"] and len(r["targets"]) == 2)
    lines = ds[pos]["answer"].splitlines()
    names = [t["name"] for t in ds.rows[pos]["targets"]]
    for line, name in zip(lines[3:], names):
        label = line[2:].rsplit(" ", 1)[0]
        assert label != name and vocabulary.matches_target(label, name)


def test_augmentation_moves_masks_with_the_image(tmp_path):
    from raddiagseg.data.dataset import ManifestDataset

    mask = np.zeros((96, 96), np.uint8)
    mask[20:50, 30:70] = 1
    io.write_png(tmp_path / "img.png", mask * 200 + 20)
    io.write_png(tmp_path / "m.png", mask)
    row = {"id": "a", "task": "refseg", "source": "t", "modality": "xray", "split": "train", "image": "img.png",
           "question": "q", "answer": templates.refseg_answer("lung"), "detection": None, "diagnosis": None,
           "targets": [{"name": "lung", "role": "organ", "mask": "m.png"}]}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    ds = ManifestDataset(tmp_path, augment=True, synonym_prob=0.0)
    moved = 0
    for epoch in range(6):
        ds.set_epoch(epoch)
        sample = ds[0]
        aug_mask = sample["masks"][0].astype(bool)
        bright = sample["image"] > 0.5
        dice = 2 * (aug_mask & bright).sum() / (aug_mask.sum() + bright.sum())
        assert dice > 0.9 and set(np.unique(sample["masks"][0])) <= {0, 1}
        moved += not np.array_equal(aug_mask, mask.astype(bool))
    assert moved >= 2  # the affine transform actually changes the geometry


def test_sampler_mixes_tasks_by_ratio_deterministically_and_shards(built, caplog):
    from raddiagseg.data.dataset import ManifestDataset, TaskRatioSampler

    ds = ManifestDataset(built["out"], split="train")
    sampler = TaskRatioSampler(ds, num_samples=200, seed=5)
    order = list(sampler)
    counts = Counter(ds.tasks[i] for i in order)
    assert counts == {"vqaseg": 120, "vqa": 80}
    assert list(TaskRatioSampler(ds, num_samples=200, seed=5)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    shards = [list(TaskRatioSampler(ds, num_samples=200, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [67, 67, 66]
    assert sorted(sum(shards, [])) == sorted(order)
    with caplog.at_level(logging.WARNING):
        only = TaskRatioSampler(ds, ratios={"vqaseg": 0.5, "reasonseg": 0.5}, num_samples=10)
    assert "reasonseg" in caplog.text and only.ratios == {"vqaseg": 1.0}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "raddiagseg", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_stats_command_prints_counts_and_writes_chart(built):
    result = run_cli("stats", built["out"])
    assert result.returncode == 0, result.stderr
    n_vqaseg = sum(r["task"] == "vqaseg" for r in built["rows"])
    assert f"vqaseg  {n_vqaseg:>7d}" in result.stdout and "Pancreas tumour" in result.stdout
    png = built["out"] / "stats.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_command_reports_bad_input_and_keeps_the_rest(built, tmp_path):
    covid = tmp_path / "covid"
    images = covid / "Train" / "Normal" / "images"
    images.mkdir(parents=True)
    (images / "Normal (1).png").write_bytes(b"not a png")
    result = run_cli("build", "--covidqu", covid, "--slake", built["paths"]["slake"], "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "Normal (1).png" in result.stdout and "skipped 1 item" in result.stdout
    assert read_manifest(tmp_path / "out")

    result = run_cli("build", "--covidqu", covid, "--out", tmp_path / "out2")
    assert result.returncode == 2
    assert "nothing usable" in result.stderr.strip().splitlines()[-1]
    result = run_cli("build", "--out", tmp_path / "out3")
    assert result.returncode == 2 and "give at least one source" in result.stderr
