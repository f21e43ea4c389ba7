"""Phantoms: plausible HU and anatomy, separable X-ray classes, determinism, the public layouts on disk."""

import hashlib
import json
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from raddiagseg.data import phantoms
from raddiagseg.data.layouts import write_phantoms


def test_ct_phantom_has_plausible_hu_and_a_hypodense_tumour_inside_the_organ():
    rng = np.random.default_rng(0)
    for task, organ_hu in (("liver", (50, 80)), ("pancreas", (30, 55))):
        ct = phantoms.generate_ct(rng, task, size=128, slices=20, tumours=2)
        hu, label = ct.hu.astype(float), ct.label
        assert ct.hu.dtype == np.int16 and hu.shape == label.shape == (20, 128, 128)
        assert set(np.unique(label)) == {0, 1, 2} and ct.n_tumours >= 1
        organ_mean, tumour_mean = np.median(hu[label == 1]), np.median(hu[label == 2])
        assert organ_hu[0] < organ_mean < organ_hu[1]
        assert 25 < organ_mean - tumour_mean < 85
        assert hu[:, :3, :3].mean() < -900  # air around the body
        assert (hu > 400).sum() > 100  # bone (spine)
        assert 2.0 <= ct.spacing[0] <= 5.0 and 0.6 <= ct.spacing[1] <= 1.0


def test_ct_phantom_tumour_free_volume_has_no_tumour_label():
    ct = phantoms.generate_ct(np.random.default_rng(1), "liver", size=96, slices=12, tumours=0)
    assert (ct.label == 2).sum() == 0 and (ct.label == 1).sum() > 0


def test_xray_classes_differ_where_expected():
    rng = np.random.default_rng(2)
    covid, noncovid, normal = (phantoms.generate_xray(rng, k, size=128) for k in phantoms.XRAY_CLASSES)
    for x in (covid, noncovid, normal):
        assert x.image.dtype == np.uint8 and x.image.shape == (128, 128) and x.lung.sum() > 1000
    # COVID-19: bilateral infection inside the lungs; others ship blank infection masks
    assert covid.infection.sum() > 50 and not (covid.infection & ~covid.lung).any()
    assert covid.infection[:, :64].any() and covid.infection[:, 64:].any()
    assert noncovid.infection.sum() == 0 and normal.infection.sum() == 0
    # the opacities are brighter than the clear lung around them
    for x in (covid, noncovid):
        clear = x.lung.astype(bool) & ~x.opacity.astype(bool)
        assert x.image[x.opacity.astype(bool)].mean() > x.image[clear].mean() + 10
    assert normal.opacity.sum() == 0


def test_unknown_phantom_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown CT phantom task"):
        phantoms.generate_ct(np.random.default_rng(0), "brain")
    with pytest.raises(ValueError, match="unknown X-ray class"):
        phantoms.generate_xray(np.random.default_rng(0), "Tuberculosis")


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        data = path.read_bytes()
        if path.name.endswith(".nii.gz"):  # gzip headers hold a timestamp: compare the voxels
            data = np.asarray(nib.load(str(path)).dataobj).tobytes()
        h.update(data)
    return h.hexdigest()


def test_phantoms_are_deterministic_per_seed_and_written_in_public_layouts(tmp_path):
    kwargs = dict(ct_volumes=2, xrays=6, ct_size=96, ct_slices=10, xray_size=64, vqa_images=4)
    a = write_phantoms(tmp_path / "a", seed=7, **kwargs)
    write_phantoms(tmp_path / "b", seed=7, **kwargs)
    write_phantoms(tmp_path / "c", seed=8, **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    liver = tmp_path / "a" / "Task03_Liver"
    meta = json.loads((liver / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "cancer"}
    assert meta["training"] == [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}]
    assert (tmp_path / "a" / "Task07_Pancreas" / "labelsTr" / "pancreas_0.nii.gz").is_file()
    tree = tmp_path / "a" / "COVID-QU-Ex" / "Infection Segmentation Data" / "Infection Segmentation Data"
    assert (tree / "Train" / "COVID-19" / "images" / "covid_1.png").is_file()
    assert (tree / "Train" / "Non-COVID" / "lung masks" / "non_COVID (1).png").is_file()
    assert (tree / "Val" / "Normal" / "infection masks" / "Normal (2).png").is_file()
    assert a["vqarad"].name == "VQA_RAD Dataset Public.json"
    assert (tmp_path / "a" / "VQA_RAD" / "VQA_RAD Image Folder").is_dir()
    assert (tmp_path / "a" / "SLAKE" / "imgs" / "xmlab0" / "source.jpg").is_file()
    assert {p.name for p in (tmp_path / "a" / "SLAKE").glob("*.json")} == {"train.json", "validate.json", "test.json"}
    biomedparse = sorted(p.name for p in (a["refseg"] / "train_mask").iterdir())
    assert biomedparse and all(re.fullmatch(r"phantom\d+_\d+_CT_abdomen_[a-z+]+\.png", n) for n in biomedparse)


def test_phantoms_command_rejects_bad_counts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "raddiagseg", "phantoms", "--out", str(tmp_path), "--ct-volumes", "0",
                             "--xrays", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "must be" in result.stderr


def test_phantom_files_do_not_depend_on_the_number_of_worker_processes(tmp_path):
    kwargs = dict(ct_volumes=3, xrays=6, ct_size=64, ct_slices=6, xray_size=64, vqa_images=4, refseg_images=3, seed=5)
    write_phantoms(tmp_path / "one", workers=1, **kwargs)
    write_phantoms(tmp_path / "three", workers=3, **kwargs)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "three")
    assert len(list((tmp_path / "one").rglob("*.nii.gz"))) == 6  # image + label per volume
