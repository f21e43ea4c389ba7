"""RadDiagSeg-M demo preset end to end: overfit 4 phantom-like samples, then generate, batch, cache and reload.

Loss parts, collate validation and checkpoint errors (training behaviour: test_model_overfit.py).
"""

import pytest
import torch
from model_helpers import four_samples

pytestmark = pytest.mark.usefixtures("single_thread")



@pytest.fixture(scope="module")
def samples():
    return four_samples()


def test_forward_reports_each_loss_part(single_thread, samples):
    from raddiagseg import build_model

    torch.manual_seed(0)
    model = build_model("demo")
    negative = dict(samples[0], answer="1. No", masks=[])
    out = model(model.processor.collate([samples[0], negative, samples[1]]))
    assert set(out) == {"loss", "loss_text", "loss_bce", "loss_dice", "n_masks"}
    assert int(out["n_masks"]) == 4
    assert out["loss"].requires_grad
    w = model.config.loss
    expected = w.text * out["loss_text"] + w.seg * (w.bce * out["loss_bce"] + w.dice * out["loss_dice"])
    assert torch.allclose(out["loss"], expected)
    # a batch without any mask still trains the text
    out = model(model.processor.collate([negative]))
    assert int(out["n_masks"]) == 0 and float(out["loss_bce"]) == 0.0 and out["loss"].requires_grad


def test_collate_rejects_masks_that_do_not_match_the_answer(samples):
    from raddiagseg import build_model

    model = build_model("demo")
    with pytest.raises(ValueError, match="2 seg tokens but 1 masks"):
        model.processor.collate([dict(samples[0], masks=samples[0]["masks"][:1])])
    with pytest.raises(ValueError, match="mask shape"):
        model.processor.collate([dict(samples[0], masks=[m[:-1] for m in samples[0]["masks"]])])


def test_load_model_errors_are_clear(tmp_path):
    from raddiagseg import load_model

    with pytest.raises(FileNotFoundError, match="not a RadDiagSeg checkpoint"):
        load_model(tmp_path)



def test_describe_paper_builds_on_meta_with_the_real_component_sizes():
    from raddiagseg.model.describe import describe_preset

    info = describe_preset("paper")
    c = info["components"]
    lm_base = c["language_model"]["parameters"] - c["language_model"]["trainable"]
    assert 2.55e9 < lm_base < 2.70e9  # Gemma-2 LM of PaliGemma2-3b (2.62 B incl. embeddings)
    assert 88e6 < c["vision_backbone"]["parameters"] < 91e6  # SAM ViT-B image encoder (89.7 M)
    assert 85e6 < c["clip_encoder"]["parameters"] < 87e6  # ViT-B/16 trunk (85.8 M)
    assert c["vision_backbone"]["trainable"] == 0 and c["clip_encoder"]["trainable"] == 0
    assert 0 < c["language_model"]["trainable"] < 0.01 * lm_base  # LoRA + seg-token rows only
    assert info["image_tokens"] == 256 and info["vocab_size"] == 257216


def test_describe_command_prints_components(capsys):
    from raddiagseg.cli import main

    assert main(["describe", "--preset", "demo"]) == 0
    out = capsys.readouterr().out
    for name in ("vision_backbone", "clip_encoder", "projector", "language_model", "mask_decoder", "total"):
        assert name in out
    assert main(["describe", "--checkpoint", "/nonexistent/ckpt"]) == 2


def test_demo_model_can_switch_to_paper_style_fine_tuning_and_reload(single_thread, samples, tmp_path):
    from raddiagseg import build_model, load_model

    torch.manual_seed(0)
    model = build_model("demo").eval()
    batch = model.processor.collate(samples[:2])
    with torch.no_grad():
        before = float(model(batch)["loss"])
    model.set_trainable(lm="lora", vision=False, clip=False, prompt_encoder=False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any("trainable_tokens" in n for n in names)
    assert not any(n.startswith(("vision_backbone.", "clip_encoder.", "mask_decoder.prompt_encoder.")) for n in names)
    assert not any(n.startswith("language_model.") and "lora_" not in n and "trainable_tokens" not in n for n in names)
    with torch.no_grad():
        assert abs(float(model(batch)["loss"]) - before) < 1e-4  # adapters start as identity
    with pytest.raises(ValueError, match="unknown trainable flags"):
        model.set_trainable(everything=True)
    loaded = load_model(model.save_pretrained(tmp_path / "lora"))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == names
    with torch.no_grad():
        assert abs(float(loaded(batch)["loss"]) - before) < 1e-4


def test_prefix_lm_attention_is_bidirectional_on_the_prompt_and_causal_on_the_answer():
    from raddiagseg import build_model

    torch.manual_seed(0)
    lm = build_model("demo").language_model.eval()
    assert lm.config.prefix_attention
    embeds = torch.randn(1, 10, lm.config.hidden_size)
    prefix = torch.tensor([[True] * 6 + [False] * 4])
    with torch.no_grad():
        base, _ = lm(embeds, prefix_mask=prefix)
        later_prompt = embeds.clone()
        later_prompt[0, 5] += 1.0
        changed, _ = lm(later_prompt, prefix_mask=prefix)
        later_answer = embeds.clone()
        later_answer[0, 8] += 1.0
        answer_changed, _ = lm(later_answer, prefix_mask=prefix)
    assert not torch.allclose(changed[0, 0], base[0, 0], atol=1e-4)  # prompt token 0 sees prompt token 5
    assert torch.allclose(answer_changed[0, :8], base[0, :8], atol=1e-5)  # nothing sees a later answer token
    assert not torch.allclose(answer_changed[0, 8], base[0, 8], atol=1e-4)


def test_only_parameters_the_forward_uses_are_trainable_and_checkpointing_keeps_the_loss(samples):
    from raddiagseg import build_model

    torch.manual_seed(0)
    model = build_model("demo")
    batch = model.processor.collate(samples[:2])
    out = model(batch)
    out["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    again = model(batch)
    again["loss"].backward()
    assert torch.allclose(again["loss"], out["loss"], atol=1e-5)
    name = "language_model.lm.model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(dict(model.named_parameters())[name].grad, grads[name], atol=1e-5)
