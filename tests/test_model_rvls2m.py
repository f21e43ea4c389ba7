"""RVLS2M (paper 003 Algorithm 1): similarity map -> grid pooling -> τ cells -> dense SAM prompt; config on/off."""

import json

import pytest
import torch
from model_helpers import phantom_sample

from raddiagseg.model import rvls2m

pytestmark = pytest.mark.usefixtures("single_thread")


def test_similarity_map_is_a_softmax_over_the_image_tokens():
    feats = torch.zeros(1, 4, 8, 8)
    feats[0, 0, 2, 5] = 5.0  # one token aligned with the prompt
    maps = rvls2m.similarity_map(feats, torch.tensor([[1.0, 0, 0, 0]]))
    assert maps.shape == (1, 8, 8)
    assert torch.isclose(maps.sum(), torch.tensor(1.0))
    assert divmod(int(maps.reshape(-1).argmax()), 8) == (2, 5)


def test_grid_pooling_averages_cells_and_drops_the_remainder():
    m = torch.arange(36, dtype=torch.float32).reshape(1, 6, 6)
    pooled = rvls2m.grid_pool(m, 2)  # b = 3
    assert pooled.shape == (1, 2, 2)
    assert pooled[0, 0, 0] == m[0, :3, :3].mean() and pooled[0, 1, 1] == m[0, 3:, 3:].mean()
    pooled = rvls2m.grid_pool(torch.ones(1, 7, 7), 3)  # b = 2: row/column 6 ignored
    assert pooled.shape == (1, 3, 3)
    with pytest.raises(ValueError, match="finer"):
        rvls2m.grid_pool(m, 7)


def test_tau_strategies_select_the_most_similar_cells():
    regions = torch.tensor([[[0.1, 0.9], [0.5, 0.2]]])
    assert rvls2m.select_cells(regions, "topk", 2).tolist() == [[[0.0, 1.0], [1.0, 0.0]]]
    assert rvls2m.select_cells(regions, "mean").tolist() == [[[0.0, 1.0], [1.0, 0.0]]]  # mean 0.425
    with pytest.raises(ValueError, match="top_k"):
        rvls2m.select_cells(regions, "topk", 5)
    with pytest.raises(ValueError, match="strategy"):
        rvls2m.select_cells(regions, "otsu")


def test_region_of_a_bright_blob_and_its_mask_prompt():
    feats = torch.zeros(1, 2, 16, 16)
    feats[0, 0, 4:8, 9:13] = 3.0  # the image tokens the seg embedding matches
    regions = rvls2m.region_masks(feats, torch.tensor([[1.0, 0.0]]), grid=4, top_k=1)
    assert regions[0].nonzero().tolist() == [[1, 2]]  # cell rows 4-7, cols 8-11 holds most of the blob
    prompt = rvls2m.mask_prompt(regions, embedding_size=16, mask_size=64)
    assert prompt.shape == (1, 1, 64, 64)
    inside = prompt[0, 0] > 0
    assert inside[16:32, 32:48].all() and int(inside.sum()) == 16 * 16  # one cell = 4 tokens = 16 mask pixels a side
    assert set(prompt.unique().tolist()) == {-1.0, 1.0}


def test_perturbed_regions_stay_nonempty_and_change():
    g = torch.Generator().manual_seed(0)
    region = torch.zeros(5, 6, 6)
    region[:, 2:4, 2:4] = 1
    out = rvls2m.perturb_regions(region, g)
    assert out.shape == region.shape and all(bool(r.any()) for r in out)
    assert any(not torch.equal(o, r) for o, r in zip(out, region))


@pytest.fixture(scope="module")
def models():
    from raddiagseg import build_model

    torch.manual_seed(0)
    plain = build_model("demo")
    torch.manual_seed(0)
    region = build_model("demo", rvls2m={"enabled": True})
    return plain, region


def test_config_default_off_and_old_configs_load(models, tmp_path):
    plain, region = models
    assert plain.config.rvls2m.enabled is False and region.config.rvls2m.enabled is True
    assert (region.config.rvls2m.grid, region.config.rvls2m.top_k) == (8, 8)
    # RVLS2M needs no new weights: SAM's mask branch is in every checkpoint; it trains only when RVLS2M is on
    downscale = [p.requires_grad for p in region.mask_decoder.prompt_encoder.mask_downscaling.parameters()]
    assert all(downscale) and not any(p.requires_grad for p in plain.mask_decoder.prompt_encoder.mask_downscaling.parameters())
    folder = plain.save_pretrained(tmp_path / "old")
    data = json.loads((folder / "config.json").read_text())
    data.pop("rvls2m")  # a checkpoint saved before the option existed
    (folder / "config.json").write_text(json.dumps(data))
    from raddiagseg import load_model

    loaded = load_model(folder)
    assert loaded.config.rvls2m.enabled is False
    region.save_pretrained(tmp_path / "new")
    assert load_model(tmp_path / "new").config.rvls2m.enabled is True


def test_training_step_uses_region_prompts_and_trains_the_mask_branch(models):
    _, model = models
    model.train()
    batch = model.processor.collate([phantom_sample("liver", size=64)])
    model.zero_grad()
    calls = []
    handle = model.mask_decoder.prompt_encoder.mask_downscaling.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = model(batch)
        out["loss"].backward()
    finally:
        handle.remove()
    assert calls, "RVLS2M on: SAM's mask branch embeds the region masks"
    grads = [p.grad for p in model.mask_decoder.prompt_encoder.mask_downscaling.parameters()]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    model.eval()


def test_inference_toggle_changes_the_dense_prompt(models):
    _, model = models
    image = phantom_sample("liver", size=64)["image"]
    features = model.encode_images([image])
    hidden = torch.randn(2, model.config.language.hidden_size)
    index = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        on = model.mask_decoder(features.vision, hidden, index, region=model.region_config())
        off = model.mask_decoder(features.vision, hidden, index, region=model.region_config(False))
        again = model.mask_decoder(features.vision, hidden, index, region=model.region_config(True))
    assert not torch.allclose(on, off) and torch.allclose(on, again)
    with pytest.raises(ValueError, match="top_k"):
        model.set_rvls2m(True, top_k=65)


def test_generation_and_tts_with_rvls2m(models):
    _, model = models
    image = phantom_sample("liver", size=64)["image"]
    result = model.generate(image, "Please segment liver in the CT scan.", max_new_tokens=6, rvls2m=True)
    assert isinstance(result.answer, str)

    calls = []
    original = model.mask_decoder.region_prompt
    model.mask_decoder.region_prompt = lambda regions, dtype: (calls.append(regions.clone()), original(regions, dtype))[1]
    try:
        # force a seg token: the LM writes <seg000> at once, then eos
        seg, eos = model.processor.ids["seg"][0], model.processor.ids["eos"]
        step = {"n": 0}
        vocab = model.language_model.causal_lm.lm_head.out_features
        logits_fn = model.language_model.logits

        def scripted(hidden):
            out = torch.full((*hidden.shape[:-1], vocab), -1e4)
            out[..., seg if step["n"] % 2 == 0 else eos] = 1e4
            step["n"] += 1
            return out

        model.language_model.logits = scripted
        res = model.generate_tts(image, "Please segment liver in the CT scan.", num_answers=1, num_masks=3, max_new_tokens=2)
    finally:
        model.language_model.logits = logits_fn
        model.mask_decoder.region_prompt = original
    assert res.segments and len(calls) == 1 and calls[0].shape[0] == 3  # 1 path x 3 perturbed region masks
    assert not torch.equal(calls[0][0], calls[0][1]) or not torch.equal(calls[0][0], calls[0][2])
    assert 0.0 <= res.agreement["uncertainty"] <= 1.0 and res.agreement["masks_per_path"] == 3
