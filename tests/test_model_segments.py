"""Seg tokens in a generated answer -> one mask each, tied to the label text before it; no token -> no decoder call.

The LM's next-token choice is scripted (its logits are replaced by a one-hot on a fixed answer),
so the test exercises the real generation path: KV-cached decoding, seg-token hidden states,
the mask decoder and label extraction.
"""

import numpy as np
import pytest
import torch

from raddiagseg.answers import parse_answer, token_labels

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    from raddiagseg import build_model

    torch.manual_seed(0)
    return build_model("demo").eval()


def scripted(model, answer):
    """Make the LM 'write' `answer` then eos in every decoding pass (every row of a batch); returns the restore function."""
    proc = model.processor
    script = proc.answer_ids(answer)
    position = {"step": 0}

    vocab = model.language_model.causal_lm.lm_head.out_features

    def logits(hidden):
        out = torch.full((*hidden.shape[:-1], vocab), -1e4)
        out[..., script[min(position["step"], len(script) - 1)]] = 1e4
        position["step"] += 1
        return out

    forward = model.language_model.forward

    def forward_restarting_script(*args, **kwargs):
        if kwargs.get("past_key_values") is None:  # a prefill: a new decoding pass starts the script again
            position["step"] = 0
        return forward(*args, **kwargs)

    model.language_model.logits = logits
    model.language_model.forward = forward_restarting_script

    def restore():
        del model.language_model.logits
        del model.language_model.forward

    return restore


def test_three_seg_tokens_give_three_masks_tied_to_three_labels(model):
    answer = "1. Yes\n2. Liver tumour\n3. Segmentation masks:\n- liver <seg000>\n* liver tumour: <seg001>\n- spleen <seg002>"
    restore = scripted(model, answer)
    try:
        image = np.random.default_rng(0).random((70, 90), dtype=np.float32)
        calls = model.mask_decoder_calls
        res = model.generate(image, "Segment everything.", max_new_tokens=64)
    finally:
        restore()
    assert res.answer == answer
    assert [s.label for s in res.segments] == ["liver", "liver tumour", "spleen"]
    assert [s.token for s in res.segments] == ["<seg000>", "<seg001>", "<seg002>"]
    assert all(s.mask.shape == (70, 90) and s.mask.dtype == bool for s in res.segments)
    assert model.mask_decoder_calls == calls + 1
    assert res.latencies["mask_decoder"] > 0


def test_answer_without_seg_tokens_gives_no_mask_and_no_decoder_call(model):
    restore = scripted(model, "1. No")
    try:
        calls = model.mask_decoder_calls
        res = model.generate(np.zeros((32, 32), np.float32), "Is there an abnormality?", max_new_tokens=16)
    finally:
        restore()
    assert res.answer == "1. No"
    assert res.segments == [] and model.mask_decoder_calls == calls
    assert res.latencies["mask_decoder"] == 0.0


def test_label_text_is_the_text_before_the_token_on_its_line():
    text = "3. liver <seg000>, tumour <seg001>\n- hepatic lesion: <seg002>\n<seg003>"
    assert [label for label, _ in token_labels(text)] == ["liver", "tumour", "hepatic lesion", ""]
    assert token_labels("Here is the mask for left kidney <seg000>.") == [("left kidney", "<seg000>")]


def test_the_model_and_the_scorer_name_the_masks_of_an_inline_list_alike(model):
    """Regression: the model named these masks "Segmentation masks: liver" and "and liver tumour"."""
    answer = "1. Yes\n2. Liver tumour\n3. Segmentation masks: liver <seg000> and liver tumour <seg001>"
    restore = scripted(model, answer)
    try:
        res = model.generate(np.random.default_rng(2).random((40, 48), dtype=np.float32), "Segment.", max_new_tokens=64)
    finally:
        restore()
    assert res.answer == answer
    assert [(s.label, s.token) for s in res.segments] == [("liver", "<seg000>"), ("liver tumour", "<seg001>")]
    assert parse_answer(answer).segments == [("liver", "<seg000>"), ("liver tumour", "<seg001>")]


def test_bad_inputs_are_refused_clearly(model):
    with pytest.raises(ValueError, match="2D image"):
        model.generate(np.zeros((4, 4, 3), np.float32), "question")
    with pytest.raises(ValueError, match="NaN"):
        model.generate(np.full((8, 8), np.nan, np.float32), "question")
    with pytest.raises(ValueError, match="non-empty"):
        model.generate(np.zeros((8, 8), np.float32), "  ")
    with pytest.raises(ValueError, match="2 questions for 1 images"):
        model.generate_batch([np.zeros((8, 8), np.float32)], ["a", "b"])


def test_bfloat16_model_generates_masks():
    from raddiagseg import build_model

    torch.manual_seed(0)
    half = build_model("demo").to(torch.bfloat16).eval()
    restore = scripted(half, "Here is the mask for liver <seg000>.")
    try:
        res = half.generate(np.random.default_rng(1).random((40, 50), dtype=np.float32), "Please segment liver.")
    finally:
        restore()
    assert [s.label for s in res.segments] == ["liver"]
    assert res.segments[0].mask.shape == (40, 50)


def test_test_time_scaling_votes_answers_and_picks_the_consensus_mask():
    from raddiagseg.model.tts import consensus_index, majority_answer

    index, members, share = majority_answer(["1. No", "1. Yes\n2. Liver tumour", "1.  yes\n2. liver tumour", "1. No"], prefer=1)
    assert (index, members, share) == (1, [1, 2], 0.5)  # tie broken toward the greedy path
    assert majority_answer(["a", "b", "b"], prefer=0)[:2] == (1, [1, 2])
    # chain-of-thought paths vote on their conclusion, not on the wording of their reasoning
    cot = ["Modality: CT scan.\nFinding: a lesion.\nConclusion:\n1. Yes\n2. Liver tumour",
           "Modality: CT.\nFinding: a focal lesion within the liver.\nConclusion:\n1. yes\n2. liver tumour.",
           "Modality: CT scan.\nFinding: none.\nConclusion:\n1. No"]
    assert majority_answer(cot, prefer=2)[1:] == ([0, 1], 2 / 3)
    square = np.zeros((20, 20), bool)
    square[5:15, 5:15] = True
    shifted = np.roll(square, 1, axis=1)
    outlier = np.zeros((20, 20), bool)
    outlier[0:3, 0:3] = True
    best, agreement = consensus_index([outlier, shifted, square, np.roll(square, 1, axis=0)])
    assert best == 2 and 0.5 < agreement < 1.0


def test_test_time_scaling_runs_the_full_path(model):
    restore = scripted(model, "1. Yes\n2. Liver tumour\n3. Segmentation masks:\n- liver <seg000>\n- liver tumour <seg001>")
    try:
        res = model.generate_tts(np.random.default_rng(2).random((48, 64), dtype=np.float32), "Diagnose.",
                                 num_answers=3, num_masks=3, max_new_tokens=48)
    finally:
        restore()
    # the scripted LM gives every path the same answer; each token's mask is one of 3 paths x 3 prompts
    assert res.agreement["answer"] == 1.0 and res.agreement["paths"] == 3
    assert len(res.agreement["masks"]) == 2 and all(0.0 <= a <= 1.0 for a in res.agreement["masks"])
    assert [s.label for s in res.segments] == ["liver", "liver tumour"]
    assert res.segments[0].mask.shape == (48, 64)
