"""RadDiagSeg-M demo preset end to end: overfit 4 phantom-like samples, then generate, batch, cache and reload.

Issue 2 acceptance: text CE < 0.05 and mean Dice > 0.9 after a few hundred steps; `generate`
reproduces the answers and masks; a saved checkpoint reloads with identical outputs.
"""

import numpy as np
import pytest
import torch
from model_helpers import dice, four_samples

pytestmark = pytest.mark.usefixtures("single_thread")

MAX_STEPS = 300


@pytest.fixture(scope="module")
def samples():
    return four_samples()


@pytest.fixture(scope="module")
def trained(single_thread, samples):
    from raddiagseg import build_model

    torch.manual_seed(0)
    model = build_model("demo")
    batch = model.processor.collate(samples)
    optimiser = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    history = []
    for step in range(MAX_STEPS):
        out = model(batch)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        optimiser.step()
        optimiser.zero_grad()
        history.append({k: float(v.detach()) for k, v in out.items()})
        if history[-1]["loss_text"] < 0.01 and history[-1]["loss_dice"] < 0.03:
            break
    model.eval()
    return model, history


def test_overfit_reaches_text_and_mask_targets(trained):
    _, history = trained
    final = history[-1]
    assert len(history) <= MAX_STEPS
    assert final["loss_text"] < 0.05, final
    assert 1.0 - final["loss_dice"] > 0.9, final


def test_generate_reproduces_answers_and_masks(trained, samples):
    model, _ = trained
    dices = []
    for s in samples:
        res = model.generate(s["image"], s["question"], max_new_tokens=48)
        assert res.answer == s["answer"]
        assert [seg.token for seg in res.segments] == ["<seg000>", "<seg001>"]
        organ, lesion = s["answer"].splitlines()[-2:]
        assert [seg.label for seg in res.segments] == [organ[2:-9], lesion[2:-9]]  # "- liver <seg000>" -> "liver"
        for seg, gt in zip(res.segments, s["masks"]):
            assert seg.mask.dtype == bool and seg.mask.shape == s["image"].shape
            assert 0.5 < seg.score <= 1.0
            dices.append(dice(seg.mask, gt))
        assert set(res.latencies) == {"preprocess", "vision", "clip", "prefill", "decode", "decode_per_token", "mask_decoder"}
    assert np.mean(dices) > 0.9, dices


def test_cached_features_and_batched_decoding_match_single_requests(trained, samples):
    model, _ = trained
    singles = [model.generate(s["image"], s["question"], max_new_tokens=48) for s in samples]
    features = model.encode_images([s["image"] for s in samples])
    calls = model.mask_decoder_calls
    # mixed question lengths force left padding in the batch
    questions = [s["question"] for s in samples]
    batched = model.generate_batch(None, questions, features=features, max_new_tokens=48)
    assert model.mask_decoder_calls == calls + 1  # one call for the whole batch
    assert batched[1].latencies["vision"] == 0.0  # encoders skipped
    for single, res in zip(singles, batched):
        assert res.answer == single.answer
        for a, b in zip(res.segments, single.segments):
            assert a.label == b.label and dice(a.mask, b.mask) > 0.99
    again = model.generate(None, questions[2], features=features[2], max_new_tokens=48)
    assert again.answer == singles[2].answer


def test_kv_cached_decoding_matches_a_full_forward(trained, samples):
    model, _ = trained
    s = samples[0]
    res = model.generate(s["image"], s["question"], max_new_tokens=48)
    proc = model.processor
    ids = proc.prompt_ids(s["question"]) + res.token_ids
    with torch.no_grad():
        feats = model.encode_images([s["image"]])
        embeds = model.input_embeds(torch.tensor([ids]), feats.image_embeds)
        prompt = torch.zeros(1, len(ids), dtype=torch.bool)
        prompt[0, : len(ids) - len(res.token_ids)] = True
        hidden, _ = model.language_model(embeds, prefix_mask=prompt)
        greedy = model.language_model.logits(hidden[0, len(ids) - len(res.token_ids) - 1 : -1]).argmax(-1)
    assert greedy.tolist() == res.token_ids


def test_a_drafted_answer_is_verified_in_the_prefill_and_changes_nothing(trained, samples):
    """A right draft (the earlier answer) is kept whole with no decode step; wrong, partial, cut or invalid
    drafts give exactly the answers and masks of plain greedy decoding."""
    model, _ = trained
    singles = [model.generate(s["image"], s["question"], max_new_tokens=48) for s in samples]
    features = model.encode_images([s["image"] for s in samples])
    for i, single in enumerate(singles):
        res = model.generate(None, samples[i]["question"], features=features[i], max_new_tokens=48, draft=single.token_ids)
        assert res.answer == single.answer and res.token_ids == single.token_ids
        assert res.draft == {"offered": len(single.token_ids) + 1, "accepted": len(single.token_ids) + 1}  # eos included
        assert res.latencies["decode_per_token"] == 0.0  # no decode step: one pass answered
        assert len(res.segments) == 2
        for a, b in zip(res.segments, single.segments):
            assert a.label == b.label and dice(a.mask, b.mask) > 0.99
    assert singles[0].answer != singles[1].answer
    image_id = model.processor.ids["image"]
    drafts = [singles[1].token_ids, singles[1].token_ids[:5], [image_id] * 4, None]  # wrong, partial, invalid, none
    questions = [s["question"] for s in samples]
    batched = model.generate_batch(None, questions, features=features, max_new_tokens=48, drafts=drafts)
    for res, single in zip(batched, singles):
        assert res.answer == single.answer
        for a, b in zip(res.segments, single.segments):
            assert a.label == b.label and dice(a.mask, b.mask) > 0.99
    assert batched[0].draft["accepted"] < batched[0].draft["offered"]
    assert batched[2].draft == {"offered": 0, "accepted": 0} and batched[3].draft == {"offered": 0, "accepted": 0}
    short = model.generate(None, questions[0], features=features[0], max_new_tokens=5)
    cut = model.generate(None, questions[0], features=features[0], max_new_tokens=5, draft=singles[0].token_ids)
    assert cut.token_ids == short.token_ids and len(cut.token_ids) == 5
    with pytest.raises(ValueError, match="2 drafts for 4 images"):
        model.generate_batch(None, questions, features=features, max_new_tokens=8, drafts=drafts[:2])


def test_save_and_load_round_trip_gives_identical_outputs(trained, samples, tmp_path):
    from raddiagseg import load_model

    model, _ = trained
    out_dir = model.save_pretrained(tmp_path / "ckpt")
    names = {p.name for p in out_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"} <= names
    loaded = load_model(out_dir)
    for s in samples[:2]:
        a = model.generate(s["image"], s["question"], max_new_tokens=48)
        b = loaded.generate(s["image"], s["question"], max_new_tokens=48)
        assert a.answer == b.answer
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.segments, b.segments))
    # fp16 storage halves the file and stays within the demo budget (<= 40 MB)
    half = model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    size = (half / "model.safetensors").stat().st_size
    assert size < 0.6 * (out_dir / "model.safetensors").stat().st_size and size <= 40e6
    reloaded = load_model(half)
    assert reloaded.dtype == torch.float32
    res = reloaded.generate(samples[0]["image"], samples[0]["question"], max_new_tokens=48)
    assert res.answer == samples[0]["answer"]



def test_test_time_scaling_agrees_with_a_confident_model(trained, samples):
    model, _ = trained
    s = samples[1]
    res = model.generate_tts(s["image"], s["question"], num_answers=3, num_masks=3, max_new_tokens=48)
    assert res.answer == s["answer"] and res.agreement["answer"] == 1.0
    assert min(res.agreement["masks"]) > 0.8
    assert np.mean([dice(seg.mask, gt) for seg, gt in zip(res.segments, s["masks"])]) > 0.9
