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


# Generator version 1 (variation "none") pinned: helpers regenerate the shipped model's training and held-out data
# from seeds, so its voxels must not change when version 2 does. Digest of NIfTI voxels and PNG pixels.
VERSION_1_PIXELS = "97e72a99b449a7f10fff952e692bd3a6a8eae9e008e353c5994e13335b0d1a8f"


def _pixel_digest(root):
    from PIL import Image

    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".gz", ".png")):
        h.update(str(path.relative_to(root)).encode())
        a = np.asarray(nib.load(str(path)).dataobj) if path.name.endswith(".nii.gz") else np.asarray(Image.open(path))
        h.update(a.tobytes())
    return h.hexdigest()


def test_default_phantoms_are_generator_version_1_unchanged(tmp_path):
    kwargs = dict(ct_volumes=2, xrays=6, seed=5, ct_size=64, ct_slices=6, xray_size=64, vqa_images=0, refseg_images=0,
                  workers=1)
    write_phantoms(tmp_path / "default", **kwargs)
    write_phantoms(tmp_path / "scanner", variation="scanner", **kwargs)
    assert _pixel_digest(tmp_path / "default") == VERSION_1_PIXELS != _pixel_digest(tmp_path / "scanner")
    assert not (tmp_path / "default" / "phantoms.json").exists()
    assert "generator_version" not in json.loads((tmp_path / "default" / "Task03_Liver" / "dataset.json").read_text())
    meta = json.loads((tmp_path / "scanner" / "Task07_Pancreas" / "dataset.json").read_text())
    assert (meta["generator_version"], meta["variation"]) == (2, "scanner")
    assert json.loads((tmp_path / "scanner" / "phantoms.json").read_text())["generator_version"] == 2
    with pytest.raises(ValueError, match="unknown phantom variation"):
        write_phantoms(tmp_path / "bad", variation="mri", **kwargs)


@pytest.mark.parametrize("variation", ["scanner", "mixed"])
def test_scanner_phantom_files_do_not_depend_on_the_number_of_worker_processes(tmp_path, variation):
    kwargs = dict(ct_volumes=3, xrays=6, ct_size=64, ct_slices=6, xray_size=64, vqa_images=4, refseg_images=3, seed=5,
                  variation=variation)
    write_phantoms(tmp_path / "one", workers=1, **kwargs)
    write_phantoms(tmp_path / "two", workers=2, **kwargs)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")


def test_mixed_phantoms_draw_about_half_the_studies_with_their_own_acquisition(tmp_path):
    from raddiagseg.data import layouts

    def varied(variation):
        return sum(layouts._ct_scan(np.random.default_rng([5, i]), variation) is not None for i in range(400))

    assert (varied("none"), varied("scanner")) == (0, 400)
    assert 0.4 < varied("mixed") / 400 < 0.6  # MIXED_SCANNER_SHARE = 0.5
    write_phantoms(tmp_path / "m", ct_volumes=2, xrays=4, seed=5, ct_size=64, ct_slices=6, xray_size=64,
                   vqa_images=0, refseg_images=0, workers=1, variation="mixed")
    meta = json.loads((tmp_path / "m" / "phantoms.json").read_text())
    assert (meta["generator_version"], meta["variation"]) == (2, "mixed")


def _scan(**changes):
    import dataclasses

    base = phantoms.CTScan(phase="portal venous", kernel="standard", thickness=0.6, slab=1.0, contrast=1.0, noise=1.0,
                           rotation=0.0, mirrored=False, zoom=1.0, tumour_radius=0.08)
    return dataclasses.replace(base, **changes)


def _ct(scan, seed=11, task="liver"):
    return phantoms.generate_ct(np.random.default_rng(seed), task, size=96, slices=10, tumours=2, scan=scan)


def test_scanner_ct_mirrored_anatomy_puts_the_liver_on_the_image_right():
    for mirrored, side in ((False, "left"), (True, "right")):
        ct = _ct(_scan(mirrored=mirrored))
        cols = np.nonzero(ct.label > 0)[2]
        assert (cols.mean() < 48) == (side == "left"), (mirrored, cols.mean())
        assert ct.spacing[0] == 0.6


def test_scanner_ct_thick_slices_average_neighbours_and_contrast_scales_the_tumour():
    thin, thick = _ct(_scan(slab=1.0)), _ct(_scan(slab=3.0, thickness=5.0))
    assert (thin.label == thick.label).all()  # the labels are the slice centre's; only the image is averaged
    step = lambda ct: np.abs(np.diff(ct.hu.astype(float), axis=0)).mean()  # noqa: E731
    assert step(thick) < 0.7 * step(thin)
    assert thick.spacing[0] == 5.0
    gap = {}
    for factor in (1.0, 0.5):
        ct = _ct(_scan(contrast=factor))
        hu = ct.hu.astype(float)
        gap[factor] = np.median(hu[ct.label == 1]) - np.median(hu[ct.label == 2])
    assert 0.4 < gap[0.5] / gap[1.0] < 0.6


def test_scanner_draws_vary_phase_kernel_position_and_keep_sides_when_asked():
    draws = [phantoms.draw_ct_scan(np.random.default_rng([1, i])) for i in range(200)]
    assert {d.phase for d in draws} == set(phantoms.CT_PHASES) and {d.kernel for d in draws} == set(phantoms.CT_KERNELS)
    assert 0.6 <= min(d.thickness for d in draws) < 1.0 and 4.5 < max(d.thickness for d in draws) <= 5.0
    assert 10 < sum(d.mirrored for d in draws) < 60 and any(abs(d.rotation) > np.pi / 2 for d in draws)
    kept = [phantoms.draw_ct_scan(np.random.default_rng([1, i]), flips=False) for i in range(100)]
    assert not any(d.mirrored for d in kept) and max(abs(d.rotation) for d in kept) <= phantoms.TILT
    assert not any(phantoms.draw_xray_exposure(np.random.default_rng([2, i]), flips=False).mirrored for i in range(100))


def test_scanner_xray_polarity_and_collimator_blades():
    import dataclasses

    exposure = phantoms.XrayExposure(rotation=0.0, zoom=1.0, mirrored=False, gamma=1.0, gain=0.9, offset=0.05, blur=0.8,
                                     noise=0.01, inverted=False, shutters=(0.0, 0.0, 0.1, 0.0))
    plain = phantoms.generate_xray(np.random.default_rng(4), "COVID-19", size=128, exposure=exposure)
    inverted = phantoms.generate_xray(np.random.default_rng(4), "COVID-19", size=128,
                                      exposure=dataclasses.replace(exposure, inverted=True))
    lung = plain.lung.astype(bool)
    assert plain.image[lung].mean() < plain.image[~lung].mean() and inverted.image[lung].mean() > inverted.image[~lung].mean()
    assert (plain.image[:, :13] == 255).all() and (inverted.image[:, :13] == 0).all()  # unexposed under the blade
    assert not plain.lung[:, :13].any() and not plain.infection[:, :13].any()  # nothing visible there is labelled
    assert (plain.lung == inverted.lung).all()
