"""Small phantom studies for the app's server tests: a CT volume stored with a permuted, flipped
direction and anisotropic spacing, and an 8-bit chest X-ray, written where a datastore reads them."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

APP_DIR = Path(__file__).resolve().parents[2] / "MONAILabelApp"
DEMO_MODEL = APP_DIR / "model" / "raddiagseg-demo"
ODD_ORIENTATION = "PRI"  # index axes run to P, R, I: a permuted and flipped layout of the same anatomy


def ct_phantom_image(seed=3, size=96, slices=10, task="liver", tumours=1):
    """(SimpleITK image with an odd direction, matching label image) from the project's CT phantom generator."""
    phantoms = pytest.importorskip("raddiagseg.data.phantoms")
    phantom = phantoms.generate_ct(np.random.default_rng(seed), task, size=size, slices=slices, tumours=tumours)
    images = []
    for array in (phantom.hu.astype(np.int16), phantom.label.astype(np.uint8)):
        image = sitk.GetImageFromArray(array)  # (z, row, col) = [S, P, L]: identity direction is LPS
        dz, dr, dc = phantom.spacing
        image.SetSpacing((float(dc), float(dr), float(dz)))
        image.SetOrigin((-120.0, 35.5, 410.0))
        images.append(sitk.DICOMOrient(image, ODD_ORIENTATION))
    return images[0], images[1], phantom


def xray_phantom(seed=5, kind="COVID-19", size=128):
    phantoms = pytest.importorskip("raddiagseg.data.phantoms")
    return phantoms.generate_xray(np.random.default_rng(seed), kind, size=size)


def write_studies(folder, ct_seed=3, xray_seed=5):
    """ct_liver.nii.gz (odd direction) + cxr_covid.png in `folder`; returns {id: (image, label or None)}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ct, ct_label, _ = ct_phantom_image(seed=ct_seed)
    sitk.WriteImage(ct, str(folder / "ct_liver.nii.gz"))
    xray = xray_phantom(seed=xray_seed)
    sitk.WriteImage(sitk.GetImageFromArray(xray.image), str(folder / "cxr_covid.png"))
    return {"ct_liver": (ct, ct_label), "cxr_covid": (xray.image, xray)}


def random_model_dir(folder):
    """A randomly initialised demo-preset model folder (answers are gibberish; shapes and plumbing are real)."""
    raddiagseg = pytest.importorskip("raddiagseg")
    pytest.importorskip("raddiagseg.model.raddiagseg")
    folder = Path(folder)
    raddiagseg.build_model("demo").save_pretrained(str(folder))
    return folder


def assert_same_geometry(label_path, image):
    """The label file has the image's size, spacing, origin and direction; returns its array."""
    label = sitk.ReadImage(str(label_path))
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetSpacing(), image.GetSpacing())
    assert np.allclose(label.GetOrigin(), image.GetOrigin())
    assert np.allclose(label.GetDirection(), image.GetDirection())
    return sitk.GetArrayFromImage(label)
