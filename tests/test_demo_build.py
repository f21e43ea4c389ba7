"""`raddiagseg demo`: the pipeline that builds the shipped model, on tiny data and a few steps.

The real build (240 CT volumes, 2700 X-rays, thousands of steps) is what MONAILabelApp/model/raddiagseg-demo/
holds; here we check the mechanics a user relies on: stage 0 trains only the CLIP encoder and
freezes it, the folder is a loadable fp16 model, and the card's numbers are the score report's.
"""

import json
import re

import pytest
import torch

pytest.importorskip("monai")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from raddiagseg.data.builder import build_phantom_dataset

    return build_phantom_dataset(tmp_path_factory.mktemp("demo-data"), ct_volumes=4, xrays=12, seed=7, ct_slices=6)


def test_clip_alignment_trains_only_the_clip_encoder_and_projector(tiny_data):
    from raddiagseg import build_model
    from raddiagseg.training.clip_align import align_clip_encoder, caption

    torch.manual_seed(0)
    model = build_model("demo")
    model.set_trainable(clip=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = align_clip_encoder(model, tiny_data, steps=3, batch_size=4, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("clip_encoder.") for k in changed) and any(k.startswith("projector.") for k in changed)
    assert all(k.startswith(("clip_encoder.", "projector.")) for k in changed)
    assert not any(p.requires_grad for p in model.clip_encoder.parameters())  # frozen state restored
    assert summary["steps"] == 3 and 0.0 <= summary["train_acc"] <= 1.0
    assert "ct liver: Liver tumour" == caption({"modality": "ct", "source": "msd_liver", "detection": True,
                                                 "diagnosis": "Liver tumour"})
    assert "xray chest: no abnormality" == caption({"modality": "xray", "source": "covidqu", "detection": False})


def test_alignment_augmentation_moves_a_lesion_a_little_keeps_range_and_replays_by_seed():
    from raddiagseg.training.clip_align import augment_batch

    images = torch.zeros(64, 96, 96)
    images[:, 40:56, 40:56] = 0.8  # a bright 16-px "lesion" in the middle
    out = augment_batch(images, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    again = augment_batch(images, torch.Generator().manual_seed(3))
    other = augment_batch(images, torch.Generator().manual_seed(4))
    assert torch.equal(out, again) and not torch.equal(out, other)
    # Warped images differ, but every lesion stays near the centre (shift <= 11 % of the width, rotation <= 7 deg)
    # and keeps roughly its size (scale 0.9-1.1).
    moved = (out - images).abs().mean((1, 2)) > 0.01
    assert 0.4 < float(moved.float().mean()) < 0.95  # p = 0.7 warps, plus noise / intensity changes
    bright = out > 0.4
    rows = torch.arange(96).float()
    area = bright.sum((1, 2)).float()
    centre_row = (bright.sum(2).float() * rows).sum(1) / area
    centre_col = (bright.sum(1).float() * rows).sum(1) / area
    assert float((centre_row - 47.5).abs().max()) < 8 and float((centre_col - 47.5).abs().max()) < 8
    assert float(area.min()) > 0.6 * 256 and float(area.max()) < 1.5 * 256


def test_scanner_alignment_augmentation_inverts_only_x_rays_and_spreads_contrast_more_than_basic():
    from raddiagseg.training.clip_align import augment_batch

    images = torch.full((256, 64, 64), 0.2)
    images[:, 16:48, 16:48] = 0.6
    xray = torch.arange(256) % 2 == 0
    scanner = augment_batch(images, torch.Generator().manual_seed(1), "scanner", xray)
    basic = augment_batch(images, torch.Generator().manual_seed(1), "basic", xray)
    assert float(scanner.min()) >= 0.0 and float(scanner.max()) <= 1.0
    inverted = scanner[:, 2:6, 2:6].mean((1, 2)) > 0.5  # the dark border became bright
    assert 0.05 < float(inverted[xray].float().mean()) < 0.3 and not bool(inverted[~xray].any())  # p = 0.15
    assert not bool((basic[:, 2:6, 2:6].mean((1, 2)) > 0.5).any())
    contrast = [float((x[:, 28:36, 28:36].mean((1, 2)) - x[:, 2:6, 2:6].mean((1, 2))).std()) for x in (basic, scanner)]
    assert contrast[1] > 2 * contrast[0]


def test_acquisition_augmentation_changes_ct_contrast_around_soft_tissue_and_x_ray_exposure_by_modality():
    """A CT contrast change scales soft tissue around its level and leaves air black (the tumour-organ difference
    scales, the tissue keeps its place); X-rays get wide gammas."""
    from raddiagseg.training.clip_align import CT_SOFT_TISSUE, augment_batch

    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    radius = ((yy - 63.5) ** 2 + (xx - 63.5) ** 2).sqrt()
    images = torch.zeros(256, 128, 128)  # air
    images[:, radius < 48] = CT_SOFT_TISSUE  # a round body of soft tissue (discs: rotation moves nothing)
    images[:, radius < 19] = CT_SOFT_TISSUE - 0.15  # a hypodense tumour
    xray = torch.arange(256) % 2 == 0
    out = augment_batch(images, torch.Generator().manual_seed(5), "acquisition", xray, ~xray)
    ct = out[~xray]  # sampled where zoom (15 %) and shift (7 px) keep each region what it was
    ring = (radius > 32) & (radius < 34)
    tissue, tumour, air = ct[:, ring].mean(1), ct[:, radius < 8].mean(1), ct[:, :3, :3].mean((1, 2))
    difference = tissue - tumour
    assert float(difference.min()) > 0.05 and float(difference.max()) < 0.3  # contrast x0.5-1.3 (plus noise, blur)
    assert float(difference.std()) > 0.02  # it does vary
    assert float(air.max()) < 0.1  # air stays black (up to noise and offset)
    level = tissue[(difference - 0.15).abs() > 0.04]  # where the contrast changed most, the tissue stayed near its level
    assert float((level - CT_SOFT_TISSUE).abs().median()) < 0.08
    basic = augment_batch(images, torch.Generator().manual_seed(5), "basic", xray, ~xray)
    spread = [float(x[xray][:, radius < 8].mean(1).std()) for x in (out, basic)]  # mid-grey: a gamma moves it
    assert spread[0] > 1.5 * spread[1]  # X-ray gamma 0.45-2.4 against basic's 0.8-1.25


def test_thick_slices_average_a_ct_slice_with_its_volumes_neighbours_only():
    from raddiagseg.training.clip_align import _batches, neighbour_means

    rows = [{"modality": "ct", "volume": "a", "slice": k} for k in (1, 2, 3, 5)] + \
           [{"modality": "ct", "volume": "b", "slice": 2}, {"modality": "xray"}]
    images = torch.arange(6, dtype=torch.float16)[:, None, None].expand(6, 16, 16).clone() / 10
    means = neighbour_means(rows, images)
    expected = [0.1, 0.1, 0.1, 0.3, 0.4, 0.5]  # a1: a2; a2: (a1 + a3) / 2; a3: a2 (a4 missing); a5: alone; b2; X-ray
    assert means[:, 0, 0].float().tolist() == pytest.approx(expected, abs=1e-3)
    # the acquisition batches draw from them (and run on images this small)
    batches = list(_batches(images, list(range(6)), 6, 20, seed=0, kind="acquisition", neighbours=means))
    assert len(batches) == 20 and all(b.shape == (6, 16, 16) for b, _ in batches)


def test_demo_build_writes_a_loadable_fp16_model_whose_card_quotes_the_score_report(tmp_path):
    from raddiagseg import load_model
    from raddiagseg.training.demo import DemoSettings, build_demo

    out = tmp_path / "model" / "raddiagseg-demo"
    settings = DemoSettings(out=str(out), align_steps=2, pretrain_steps=1, finetune_steps=1, train_ct_volumes=2,
                            train_xrays=6, test_ct_volumes=2, test_xrays=3, ct_slices=6,
                            model_overrides={"projector": {"num_queries": 8}}, workers=2, num_workers=1,
                            pretrain_trainable={"projector": False}, finetune_trainable={"projector": False},
                            variation="mixed", augmentation="scanner")
    card = build_demo(settings)
    assert card == out / "MODEL_CARD.md"
    assert not (out.parent / "raddiagseg-demo.tmp").exists()
    report = json.loads((out / "heldout_report.json").read_text())
    text = card.read_text()
    ct_row = next(line for line in text.splitlines() if line.startswith("| ct |"))
    cells = [c.strip() for c in ct_row.strip("|").split("|")]
    assert int(cells[1]) == report["ct"]["n"]
    assert float(cells[2]) == pytest.approx(report["ct"]["detection_f1"], abs=5e-4)
    assert re.search(r"seed 98765", text) and "never used in training" in text
    # stage 0 aligns on clean phantoms (the default), stages 1-2 train on the scanner-variation ones (two training sets)
    work = tmp_path / "model" / ".raddiagseg-demo-work"
    assert settings.align_variation == "none"
    assert (work / "data-train" / "manifest.jsonl").is_file() and (work / "data-train-mixed" / "manifest.jsonl").is_file()
    assert f'variation "none" with "{settings.align_augmentation}" augmentation in stage 0, variation "mixed" with ' \
           f'"{settings.augmentation}"' in " ".join(text.split())
    assert json.loads((work / "pretrain" / "config.json").read_text())["data"] == str(work / "data-train-mixed" / "manifest.jsonl")
    assert "val_acc_mixed" in json.loads((work / "aligned" / "alignment.json").read_text())

    config = json.loads((out / "config.json").read_text())
    assert config["trainable"]["clip"] is False
    assert config["projector"]["num_queries"] == 8  # the architecture option reached the built model
    assert config["trainable"]["projector"] is False  # so did the stage flags (saved with the model)
    assert (out / "heldout_report.csv").is_file()
    model = load_model(out, device="cpu")
    assert {p.dtype for p in model.parameters()} <= {torch.float16, torch.float32}
    assert (out / "model.safetensors").stat().st_size < 40e6
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}

    # Resumed: every finished step is reused, and the card still gives the time each one took when it ran.
    first = json.loads((tmp_path / "model" / ".raddiagseg-demo-work" / "timings.json").read_text())
    settings.resume = True
    text = build_demo(settings).read_text()
    assert "Reused from an earlier run of the same work folder (`--resume`), timed when they ran: data, CLIP alignment, " \
           "pretrain, finetune." in text
    assert f"data {first['data_s'] / 60:.1f} min, CLIP alignment {first['align_s'] / 60:.1f} min" in text


def test_card_marks_each_target_met_or_not_met():
    from raddiagseg.training.demo import targets_section

    report = {"ct": {"detection_f1": 0.96, "diagnosis_f1": 0.91, "dice_org": 0.86, "dice_abn": 0.61},
              "xray": {"detection_f1": 0.80, "diagnosis_f1": 0.90, "dice_org": None, "dice_abn": 0.7}}
    text = targets_section(report)
    ct = next(line for line in text.splitlines() if line.startswith("| ct |"))
    xray = next(line for line in text.splitlines() if line.startswith("| xray |"))
    assert "not met" not in ct and ct.count(" met") == 4
    assert "0.800 **not met**" in xray and "0.900 met" in xray and "– **not met**" in xray
    assert "2 of 8 targets not met." in text


@pytest.mark.parametrize("option, message", [
    ("clip.depht=4", "expected PART.FIELD=VALUE"),
    ("clip.depth", "expected PART.FIELD=VALUE"),
    ("clip.depth=four", "'four' is not an integer"),
])
def test_demo_model_options_are_checked_before_any_work(tmp_path, capsys, option, message):
    from raddiagseg import cli

    code = cli.main(["demo", "--out", str(tmp_path / "m"), "--model-option", option])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / ".raddiagseg-demo-work").exists()


def test_demo_model_options_parse_into_config_overrides():
    from raddiagseg.training.commands import parse_model_options

    assert parse_model_options(["clip.depth=4", "projector.num_queries=32"]) == {"clip": {"depth": 4},
                                                                            "projector": {"num_queries": 32}}


def test_train_trainable_flags_are_checked_and_parsed(tmp_path, capsys):
    from raddiagseg import cli
    from raddiagseg.training.commands import _trainable_flags

    assert _trainable_flags(["clip=true", "projector=false", "lm=lora"]) == {"clip": True, "projector": False, "lm": "lora"}
    for bad, message in (("clipp=true", "expected PART=VALUE"), ("clip=maybe", "not a valid value for clip"),
                         ("lm=half", "not a valid value for lm")):
        code = cli.main(["train", "--data", str(tmp_path), "--stage", "finetune", "--out", str(tmp_path / "run"),
                         "--trainable", bad])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
