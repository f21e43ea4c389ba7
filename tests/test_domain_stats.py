"""Domain statistics for models other than the shipped demo (issue 21 item 1): a model trained on real data, e.g. the
paper preset, gets them from its own training and held-out manifests (`raddiagseg domain-stats --fit-data
--calib-data --trained-on`), and a model fine-tuned by the app's train task inherits its parent's guard
(`raddiagseg.domain.finetuned_stats`). Shown on a small randomly initialised demo-preset model: the code path is the
one the paper preset takes (its encoders' features, the same PCA statistics); no number of the shipped model is used."""

import shutil

import numpy as np
import pytest
from app_studies import random_model_dir

from raddiagseg import cli, domain, load_model
from raddiagseg.data.records import read_manifest
from raddiagseg.evaluation.predict import sample_image

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """Two small phantom datasets of different seeds: the model's "training" images and held-out ones."""
    work = tmp_path_factory.mktemp("phantoms")
    return {name: domain.phantom_manifest(work, seed, 1, 8, ct_slices=6, workers=1)
            for name, seed in (("fit", 11), ("calib", 12))}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, manifests):
    folder = random_model_dir(tmp_path_factory.mktemp("model") / "raddiagseg-real")
    code = cli.main(["domain-stats", "--model", str(folder), "--fit-data", str(manifests["fit"]),
                     "--calib-data", str(manifests["calib"]), "--trained-on", "MSD Task03 and COVID-QU-Ex (train split)",
                     "--batch-size", "4"])
    assert code == 0
    return folder


def camera_photo():
    import skimage.data

    return (skimage.data.camera().astype(np.float32) / 255.0)


def verdict(guard, model, image, modality):
    import torch

    with torch.inference_mode():
        return guard.check(model.encode_images([image]), [image], modality, "intensities")[0]


def test_a_model_trained_on_real_data_gets_statistics_from_its_manifests(model_dir, manifests):
    stats = domain.DomainStats.load(model_dir)
    assert stats.modalities == ["ct", "xray"] and stats.meta["data"] == "manifests"
    guard = domain.DomainGuard.for_model_dir(model_dir)
    identity = guard.identity()
    assert identity == {"name": "raddiagseg-real", "trained_on": "MSD Task03 and COVID-QU-Ex (train split)",
                        "clinical_use": False, "notice": "Answered by raddiagseg-real: trained on MSD Task03 and "
                        "COVID-QU-Ex (train split), not for clinical use"}
    card = domain.card_section(model_dir)
    assert str(manifests["fit"]) in card and "not for clinical use" in card
    model = load_model(model_dir, device="cpu").eval()
    held_out = [r for r in read_manifest(manifests["calib"], base=True) if r["modality"] == "xray"][0]
    assert verdict(guard, model, sample_image(held_out), "xray")["in_domain"] is True
    photo = verdict(guard, model, camera_photo(), "xray")
    assert photo["in_domain"] is False and "unlike the model's chest X-ray training images" in photo["reason"], photo
    mr = verdict(guard, model, camera_photo(), "mri")
    assert mr["in_domain"] is False and "trained on CT and chest X-ray images only" in mr["reason"]


def test_domain_stats_arguments_are_checked(model_dir, manifests, capsys):
    assert cli.main(["domain-stats", "--model", str(model_dir), "--fit-data", str(manifests["fit"])]) != 0
    assert "give both --fit-data and --calib-data" in capsys.readouterr().err
    assert cli.main(["domain-stats", "--model", str(model_dir.parent / "none"), "--fit-data", "x", "--calib-data", "y"]) != 0
    assert "is not a model folder" in capsys.readouterr().err


def test_a_fine_tuned_model_inherits_its_parents_guard(model_dir, manifests, tmp_path):
    parent = domain.DomainStats.load(model_dir)
    child = tmp_path / "v0001-20261207T060000"
    shutil.copytree(model_dir, child, ignore=shutil.ignore_patterns(domain.STATS_FILE))
    model = load_model(child, device="cpu").eval()
    reference = [(str(manifests["fit"]), None), (str(manifests["calib"]), None)]

    model.set_trainable(vision=False, clip=False, projector=False)  # the descriptors' parts did not train: exact copy
    summary = domain.finetuned_stats(model, child, model_dir, "2 corrected images", reference)
    carried = domain.DomainStats.load(child)
    assert summary["method"].startswith("carried over (") and carried.thresholds == parent.thresholds
    assert np.array_equal(carried.blocks["xray"]["vision"].mean, parent.blocks["xray"]["vision"].mean)
    identity = domain.DomainGuard.for_model_dir(child).identity()
    assert identity["name"] == child.name and identity["clinical_use"] is False
    assert identity["trained_on"] == "MSD Task03 and COVID-QU-Ex (train split); fine-tuned on 2 corrected images"

    model.set_trainable(vision=True)  # the SAM encoder trained: thresholds recalibrated on the new model's scores
    with torch_no_grad():
        for parameter in model.vision_backbone.parameters():  # a drift of its features, as fine-tuning may cause
            parameter.mul_(1.05)
    summary = domain.finetuned_stats(model, child, model_dir, "2 corrected images", reference)
    recalibrated = domain.DomainStats.load(child)
    assert summary["method"].startswith("carried over; thresholds recalibrated"), summary
    assert all(recalibrated.thresholds[m] >= parent.thresholds[m] for m in parent.modalities)  # never tighter
    assert recalibrated.meta["finetuned_from"] == model_dir.name
    guard = domain.DomainGuard.for_model_dir(child)
    rows = [r for r in read_manifest(manifests["calib"], base=True) if r["modality"] == "xray"][:4]
    inside = [verdict(guard, model, sample_image(row), "xray")["in_domain"] for row in rows]
    assert sum(inside) >= len(rows) - 1, inside  # reference images stay in domain (all but the top quantile)
    assert verdict(guard, model, camera_photo(), "xray")["in_domain"] is False
    unchecked = domain.finetuned_stats(model, child, model_dir, "2 corrected images")
    assert unchecked["method"].startswith("carried over unchecked") and \
        domain.DomainStats.load(child).thresholds == parent.thresholds
    assert domain.finetuned_stats(model, child, child.parent / "no stats", "x", reference) is None


def torch_no_grad():
    import torch

    return torch.no_grad()


def test_the_train_task_writes_the_candidates_statistics_before_it_publishes(model_dir, manifests, tmp_path):
    """The app's train task (RadDiagSegTrain._domain_stats, called by its gate on publishing) on a candidate
    folder whose image encoder trained: statistics written, trained_on saying so, the summary for train_stats."""
    from lib import model_store
    from lib.trainers.raddiagseg import RadDiagSegTrain
    from raddiagseg.training.reference import ReferenceSet

    candidate = tmp_path / "run" / "best"
    shutil.copytree(model_dir, candidate, ignore=shutil.ignore_patterns(domain.STATS_FILE))
    model = load_model(candidate, device="cpu")
    model.set_trainable(vision=True)  # what the candidate's config says trained
    model.save_pretrained(str(candidate))
    task = RadDiagSegTrain(model_store.ModelStore(model_dir, tmp_path / "work"), tmp_path / "work")
    references = {"replay": ReferenceSet("replay", manifests["fit"], None, "phantoms"),
                  "validation": ReferenceSet("validation", manifests["calib"], None, "phantoms")}
    summary = task._domain_stats(model_dir, candidate, references, {"images": 1})
    assert summary["method"].startswith("carried over; thresholds recalibrated"), summary
    assert set(summary["reference_in_domain_at_parent_threshold"]) == {"ct", "xray"}
    trained_on = domain.DomainGuard.for_model_dir(candidate).identity()["trained_on"]
    assert trained_on.endswith("; fine-tuned on 1 corrected image saved on a RadDiag server"), trained_on
