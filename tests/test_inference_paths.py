"""The fast inference paths of the app's ModelRunner on a real (random) demo model:

- a repeat question on a cached slice runs no image encoder (only the LM and the mask decoder);
- a whole volume is encoded and decoded in batches, and slices answered "no" never reach the
  mask decoder (a batch of only "no" answers makes no decoder call);
- per-stage timings are counted once per batch, with the decode time per token;
- the serving dtype: fp32 for the demo preset on CPU, bf16 for the paper preset, built directly in bf16.

The LM's token choice is scripted per decoding pass and row (its head still runs), so which
slices answer "yes" is fixed while everything else is the real generation path.
"""


import numpy as np
import pytest
import torch
from app_studies import APP_DIR

from lib.slice_cache import SliceCache
from lib.model_runner import ModelRunner
from lib.model_store import folder_preset, load_for_serving, serving_precision

pytestmark = pytest.mark.usefixtures("single_thread")

YES = "1. Yes\n2. Liver tumour\n3. Segmentation masks:\n- liver <seg000>\n- liver tumour <seg001>"
NO = "1. No"


@pytest.fixture(scope="module")
def model():
    from raddiagseg import build_model

    torch.manual_seed(0)
    return build_model("demo").eval()


class Counting:
    """Counts encode_images calls/slices and mask-decoder prompts; scripts the answers per pass and row."""

    def __init__(self, model, passes=()):
        self.model, self.encode_calls, self.encoded, self.prompts, self.lm_calls = model, 0, 0, [], 0
        self.scripts = [[model.processor.answer_ids(a) for a in rows] for rows in passes]
        self.pass_index, self.step = -1, 0
        encode, forward, decoder = model.encode_images, model.language_model.forward, model.mask_decoder.forward
        real_logits, fused_step = model.language_model.logits, model.language_model.fused_step

        def encode_images(images):
            self.encode_calls += 1
            self.encoded += len(images)
            return encode(images)

        def lm_forward(*args, **kwargs):
            self.lm_calls += 1
            if kwargs.get("past_key_values") is None:  # a prefill starts a new decoding pass
                self.pass_index, self.step = self.pass_index + 1, 0
            return forward(*args, **kwargs)

        def fused(*args):  # a decode step that bypasses transformers' modules (LanguageModel.fused_step)
            self.lm_calls += 1
            return fused_step(*args)

        def logits(hidden):
            real = real_logits(hidden)
            if not self.scripts:
                return real
            rows = self.scripts[self.pass_index]
            out = torch.full_like(real, -1e4)
            for b, script in enumerate(rows):
                out[b, script[min(self.step, len(script) - 1)]] = 1e4
            self.step += 1
            return out

        def mask_decoder(vision, hidden, image_index, *args, **kwargs):
            self.prompts.append(image_index.tolist())
            return decoder(vision, hidden, image_index, *args, **kwargs)

        model.encode_images = encode_images
        model.language_model.forward = lm_forward
        model.language_model.logits = logits
        model.language_model.fused_step = fused
        model.mask_decoder.forward = mask_decoder

    def restore(self):
        del self.model.encode_images
        del self.model.language_model.forward
        del self.model.language_model.logits
        del self.model.language_model.fused_step
        del self.model.mask_decoder.forward


def runner_for(model, cache_items=8, drafts="slice"):
    class Store:
        def get(self):
            return model, "v1"

    return ModelRunner(Store(), SliceCache(cache_items), drafts=drafts)


def slices(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((size, size), dtype=np.float32) for _ in range(n)]


def test_repeat_question_on_a_cached_slice_runs_no_encoder(model):
    runner = runner_for(model)
    image = slices(1)[0]
    counting = Counting(model)
    try:
        first, first_stats = runner.answer([image], ["Is there a tumour?"], {"max_new_tokens": 4})
        second, second_stats = runner.answer([image], ["What is the diagnosis?"], {"max_new_tokens": 4})
        other_window, _ = runner.answer([np.clip(image * 1.5, 0, 1)], ["Is there a tumour?"], {"max_new_tokens": 4})
    finally:
        counting.restore()
    assert counting.encode_calls == 2  # the first slice once, the differently windowed one once; never the repeat
    assert first_stats["counts"] == {"encoded": 1, "cached": 0, "draft_tokens": 0, "draft_tokens_kept": 0}
    assert second_stats["counts"] == {"encoded": 0, "cached": 1, "draft_tokens": 0, "draft_tokens_kept": 0}  # another question
    assert first_stats["model"]["vision"] > 0 and first_stats["model"]["clip"] > 0
    assert second_stats["model"]["vision"] == 0.0 and second_stats["model"]["clip"] == 0.0
    assert second_stats["model"]["prefill"] > 0 and second_stats["model"]["decode_per_token"] > 0
    assert len(second[0].token_ids) == 4 and len(other_window) == 1


def test_repeat_of_the_same_question_verifies_the_earlier_answer_in_one_lm_pass(model):
    runner = runner_for(model)
    image, volume = slices(1, seed=3)[0], slices(3, seed=4)
    counting = Counting(model)
    try:
        first, _ = runner.answer([image], ["Is there a tumour?"], {"max_new_tokens": 12})
        calls = counting.lm_calls
        again, stats = runner.answer([image], ["Is there a tumour?"], {"max_new_tokens": 12})
        repeat_calls = counting.lm_calls - calls
        sampled, sampled_stats = runner.answer([image], ["Is there a tumour?"], {"max_new_tokens": 12, "do_sample": True, "seed": 1})
        whole, _ = runner.answer(volume, ["Q"] * 3, {"max_new_tokens": 12}, batch_size=3)
        calls = counting.lm_calls
        whole_again, whole_stats = runner.answer(volume, ["Q"] * 3, {"max_new_tokens": 12}, batch_size=3)
        whole_calls = counting.lm_calls - calls
    finally:
        counting.restore()
    assert len(first[0].token_ids) > 0 and again[0].token_ids == first[0].token_ids and again[0].answer == first[0].answer
    assert repeat_calls == 1  # the prompt and the drafted answer in one pass, no decode step
    assert stats["counts"]["draft_tokens_kept"] == stats["counts"]["draft_tokens"] >= len(first[0].token_ids)
    assert sampled_stats["counts"]["draft_tokens"] == 0 and len(sampled) == 1  # sampling takes no draft
    assert [r.token_ids for r in whole_again] == [r.token_ids for r in whole]
    assert whole_calls == 1 and whole_stats["counts"]["draft_tokens_kept"] == whole_stats["counts"]["draft_tokens"] > 0


def test_draft_modes_recent_drafts_a_new_slice_and_off_drafts_nothing(model, tmp_path):
    from lib.configs.raddiagseg import RadDiagSegAppConfig

    a, b = slices(2, seed=5)
    options = {"max_new_tokens": 12}
    plain_b = model.generate(None, "Q", features=model.encode_images([b]), **options)
    recent, single, off = runner_for(model, drafts="recent"), runner_for(model), runner_for(model, drafts="off")
    for runner in (recent, single, off):
        runner.answer([a], ["Q"], options)
    from_a, recent_stats = recent.answer([b], ["Q"], options)
    _, single_stats = single.answer([b], ["Q"], options)
    counting = Counting(model)
    try:
        again, off_stats = off.answer([a], ["Q"], options)
    finally:
        counting.restore()
    assert recent_stats["counts"]["draft_tokens"] > 0  # a's answer, checked against b
    assert from_a[0].token_ids == plain_b.token_ids  # whatever was kept, the answer is b's own
    assert single_stats["counts"]["draft_tokens"] == 0  # a new slice: nothing to draft from
    assert off_stats["counts"]["draft_tokens"] == 0 and counting.lm_calls == len(again[0].token_ids) + (len(again[0].token_ids) < 12)
    with pytest.raises(ValueError, match="answer_drafts must be one of slice, recent, off, got 'sometimes'"):
        RadDiagSegAppConfig(APP_DIR, str(tmp_path), {"answer_drafts": "sometimes", "work_dir": str(tmp_path / "work")})


def test_volume_batches_encoders_and_decoding_and_no_slices_skip_the_mask_decoder(model):
    runner = runner_for(model, cache_items=0)
    volume = slices(6, seed=1)
    # batch_size 3 -> two batches (two decoding passes): only slices 1 and 5 answer yes
    counting = Counting(model, passes=[[NO, YES, NO], [NO, NO, YES]])
    calls = model.mask_decoder_calls
    try:
        results, stats = runner.answer(volume, ["Q"] * 6, {"max_new_tokens": 32}, batch_size=3)
    finally:
        counting.restore()
    assert [r.answer for r in results] == [NO, YES, NO, NO, NO, YES]
    assert counting.encode_calls == 2 and counting.encoded == 6  # 3 slices per encoder call
    assert counting.pass_index == 1  # 2 batched decoding passes, not 6
    assert model.mask_decoder_calls == calls + 2
    assert counting.prompts == [[1, 1], [2, 2]]  # only the "yes" rows' two seg tokens, by their row in the batch
    assert [len(r.segments) for r in results] == [0, 2, 0, 0, 0, 2]
    assert all(s.mask.shape == (64, 64) for s in results[1].segments)
    # stage times are per batch: the summed decode is the two passes', not one copy per slice
    per_batch = results[0].latencies["decode"] + results[3].latencies["decode"]
    assert stats["model"]["decode"] == pytest.approx(per_batch)
    assert stats["model"]["vision"] > 0


def test_a_batch_of_only_no_answers_makes_no_decoder_call(model):
    runner = runner_for(model, cache_items=0)
    counting = Counting(model, passes=[[NO, NO, NO, NO]])
    calls = model.mask_decoder_calls
    try:
        results, stats = runner.answer(slices(4, seed=2), ["Q"] * 4, {"max_new_tokens": 16}, batch_size=4)
    finally:
        counting.restore()
    assert [r.answer for r in results] == [NO] * 4
    assert model.mask_decoder_calls == calls and counting.prompts == []
    assert stats["model"]["mask_decoder"] == 0.0


def test_serving_precision_per_preset_and_choice(monkeypatch):
    from lib import model_store

    f32, bf16 = torch.float32, torch.bfloat16
    assert serving_precision("paper") == (bf16, bf16)
    assert serving_precision("demo", "cpu", "float32") == (f32, f32)
    assert serving_precision("demo", "cpu", "bfloat16") == (bf16, bf16)
    assert serving_precision("demo", "cpu", "mixed") == (f32, bf16)
    monkeypatch.setattr(model_store, "cpu_has_fast_bf16", lambda: True)
    assert serving_precision("demo") == (f32, bf16)  # encoders bf16, LM and mask decoder fp32
    monkeypatch.setattr(model_store, "cpu_has_fast_bf16", lambda: False)
    assert serving_precision("demo") == (f32, f32)  # emulated bf16 would be slower: fp32 fallback


def test_mixed_precision_serves_bf16_encoders_with_an_fp32_lm(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    served = load_for_serving(tmp_path / "m", None, "mixed")
    assert {p.dtype for p in served.vision_backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in served.clip_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in served.language_model.parameters()} == {torch.float32}
    assert {p.dtype for p in served.mask_decoder.parameters()} == {torch.float32}
    image = slices(1)[0]
    features = served.encode_images([image])
    assert features.vision.dtype == torch.bfloat16 and features.image_embeds.dtype == torch.bfloat16
    result = served.generate(image, "Is there a tumour?", features=features, max_new_tokens=3)
    assert 1 <= len(result.token_ids) <= 3


def test_loading_in_bf16_builds_the_model_in_bf16(model, tmp_path):
    from raddiagseg import load_model

    model.save_pretrained(tmp_path / "m")
    assert folder_preset(tmp_path / "m") == "demo"
    loaded = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32  # restored after building
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    image = slices(1)[0]
    result = loaded.generate(image, "Is there a tumour?", max_new_tokens=3)
    assert len(result.token_ids) <= 3 and result.latencies["decode_per_token"] > 0
