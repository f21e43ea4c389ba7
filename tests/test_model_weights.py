"""Real-weight loading from local files, checked strictly (issue 2).

The tests write files in the real formats (a full-size SAM ViT-B .pth from segment-anything,
an open_clip folder, a PaliGemma folder saved by transformers) with random weights, and load
them through the same functions `build_model("paper", sam_checkpoint=..., clip_dir=..., lm_dir=...)` uses.
"""


import pytest
import torch

from raddiagseg.model.config import demo_config, paper_config
from raddiagseg.model.weight_files import sam_sized_like, write_open_clip_folder

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def full_size_sam_file(tmp_path_factory):
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"](checkpoint=None)
    path = tmp_path_factory.mktemp("medsam") / "medsam_vit_b.pth"
    torch.save(sam.state_dict(), path)
    return path, {k: sam.state_dict()[k].clone() for k in ("image_encoder.blocks.11.mlp.lin2.weight", "mask_decoder.iou_token.weight")}


def test_full_size_sam_vit_b_file_loads_strictly_into_the_paper_components(full_size_sam_file):
    from raddiagseg.model.mask_decoder import SegMaskDecoder
    from raddiagseg.model.vision_backbone import VisionBackbone
    from raddiagseg.model.weights import load_sam_checkpoint

    path, reference = full_size_sam_file
    cfg = paper_config()
    vision, decoder = VisionBackbone(cfg.vision), SegMaskDecoder(cfg.language.hidden_size, cfg.vision, cfg.mask_decoder)
    load_sam_checkpoint(path, vision, decoder)
    assert torch.equal(vision.image_encoder.blocks[11].mlp.lin2.weight, reference["image_encoder.blocks.11.mlp.lin2.weight"])
    assert torch.equal(decoder.mask_decoder.iou_token.weight, reference["mask_decoder.iou_token.weight"])


def test_wrong_or_corrupt_sam_files_fail_with_one_line_naming_the_mismatch(full_size_sam_file, tmp_path):
    from raddiagseg.model.mask_decoder import SegMaskDecoder
    from raddiagseg.model.vision_backbone import VisionBackbone
    from raddiagseg.model.weights import load_sam_checkpoint

    cfg = demo_config()  # a ViT-B file into the small demo encoder: every block is the wrong shape
    vision, decoder = VisionBackbone(cfg.vision), SegMaskDecoder(cfg.language.hidden_size, cfg.vision, cfg.mask_decoder)
    before = vision.image_encoder.patch_embed.proj.weight.clone()
    with pytest.raises(ValueError) as err:
        load_sam_checkpoint(full_size_sam_file[0], vision, decoder)
    message = str(err.value)
    assert "\n" not in message and "unexpected keys" in message and "shape mismatches" in message
    assert "image_encoder.patch_embed.proj.weight (768, 3, 16, 16) vs model (128, 3, 16, 16)" in message
    assert torch.equal(vision.image_encoder.patch_embed.proj.weight, before)  # nothing half-loaded

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full_size_sam_file[0].read_bytes()[:100_000])
    with pytest.raises(ValueError, match="not a readable PyTorch weights file") as err:
        load_sam_checkpoint(truncated, vision, decoder)
    assert "\n" not in str(err.value)

    sam = sam_sized_like(cfg.vision, cfg.mask_decoder)
    state = sam.state_dict()
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"1 missing keys \(first: mask_decoder.iou_token.weight\)"):
        load_sam_checkpoint(tmp_path / "missing.pth", vision, decoder)
    with pytest.raises(FileNotFoundError):
        load_sam_checkpoint(tmp_path / "nope.pth", vision, decoder)


def write_paligemma_folder(folder, language_cfg, tokenizer, seed=0):
    """A PaliGemma folder saved by transformers (Gemma-2 LM under language_model.model.*, SigLIP tower, tokenizer)."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    lm = language_cfg
    text = dict(model_type="gemma2", vocab_size=lm.vocab_size or len(tokenizer), hidden_size=lm.hidden_size,
                intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_hidden_layers,
                num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_key_value_heads,
                head_dim=lm.head_dim, query_pre_attn_scalar=lm.query_pre_attn_scalar)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14, projection_dim=lm.hidden_size)
    model = PaliGemmaForConditionalGeneration(PaliGemmaConfig(text_config=text, vision_config=vision, projection_dim=lm.hidden_size,
                                                              image_token_index=tokenizer.convert_tokens_to_ids("<image>")))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.model.language_model


def test_build_model_loads_all_three_weight_sources_through_the_real_formats(tmp_path):
    from raddiagseg import build_model
    from raddiagseg.model.tokenizer import build_demo_tokenizer

    cfg = demo_config()
    sam = sam_sized_like(cfg.vision, cfg.mask_decoder)
    wrapped = {"model": {f"module.{k}": v for k, v in sam.state_dict().items()}, "epoch": 3}  # MedSAM training checkpoint
    torch.save(wrapped, tmp_path / "medsam_demo.pth")
    trunk = write_open_clip_folder(tmp_path / "biomedclip", cfg.clip)
    lm = write_paligemma_folder(tmp_path / "paligemma", cfg.language, build_demo_tokenizer())

    model = build_model("demo", sam_checkpoint=str(tmp_path / "medsam_demo.pth"), clip_dir=str(tmp_path / "biomedclip"),
                        lm_dir=str(tmp_path / "paligemma"))
    assert torch.equal(model.vision_backbone.image_encoder.blocks[0].attn.qkv.weight, sam.image_encoder.blocks[0].attn.qkv.weight)
    assert torch.equal(model.mask_decoder.mask_decoder.mask_tokens.weight, sam.mask_decoder.mask_tokens.weight)
    assert torch.equal(model.clip_encoder.trunk.blocks[1].mlp.fc2.weight, trunk.blocks[1].mlp.fc2.weight)
    causal = model.language_model.causal_lm
    assert torch.equal(causal.model.layers[1].mlp.down_proj.weight, lm.layers[1].mlp.down_proj.weight)
    assert torch.equal(causal.model.embed_tokens.weight, lm.embed_tokens.weight)
    assert causal.lm_head.weight.data_ptr() == causal.model.embed_tokens.weight.data_ptr()  # still tied
    # the same patch tokens as timm's trunk on a CLIP-normalised input
    image = torch.rand(1, 64, 64)
    pixels = model.clip_encoder.preprocess(image)
    with torch.no_grad():
        assert torch.allclose(model.clip_encoder(pixels), trunk.forward_features(pixels)[:, 1:], atol=1e-5)


def test_lora_over_loaded_lm_trains_adapters_and_seg_rows_only(tmp_path):
    from raddiagseg import build_model
    from raddiagseg.model.tokenizer import build_demo_tokenizer

    cfg = demo_config()
    write_paligemma_folder(tmp_path / "paligemma", cfg.language, build_demo_tokenizer())
    model = build_model("demo", lm_dir=str(tmp_path / "paligemma"),
                        trainable={"lm": "lora", "vision": False, "clip": False, "prompt_encoder": False},
                        language={"lora_rank": 4, "vocab_size": 0})
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    lm_names = {n for n in names if n.startswith("language_model.")}
    assert lm_names and all("lora_" in n or "trainable_tokens" in n for n in lm_names)
    assert any(".q_proj.lora_A" in n for n in lm_names) and any(".down_proj.lora_B" in n for n in lm_names)
    assert not any(n.startswith(("vision_backbone.", "clip_encoder.")) for n in names)
    assert any(n.startswith("projector.") for n in names) and any(n.startswith("mask_decoder.mask_decoder.") for n in names)


def test_lm_folder_with_other_sizes_is_refused_in_one_line(tmp_path):
    from raddiagseg import build_model
    from raddiagseg.model.config import LanguageConfig
    from raddiagseg.model.tokenizer import build_demo_tokenizer

    cfg = demo_config()
    other = LanguageConfig(**{**cfg.language.__dict__, "hidden_size": 128, "intermediate_size": 256})
    write_paligemma_folder(tmp_path / "pg", other, build_demo_tokenizer())
    with pytest.raises(ValueError, match="hidden_size 128 vs model 256") as err:
        build_model("demo", lm_dir=str(tmp_path / "pg"))
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        build_model("demo", clip_dir=str(tmp_path / "pg"))


def test_seg_token_rows_are_merged_for_inference_without_changing_outputs(tmp_path):
    """eval() writes the trainable seg-token rows into the embedding (no full-matrix copy per token); train() takes
    them out; logits are the same either way, also when eval() runs inside inference mode, and training still works."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    from raddiagseg import build_model

    torch.manual_seed(0)
    model = build_model("demo", trainable={"lm": "lora"}, language={"lora_rank": 4})
    lm = model.language_model
    seg = torch.tensor([lm.seg_ids[:3] + [5, 7]])
    with torch.no_grad():  # trained seg rows differ from the base rows
        for layer in lm.modules():
            if isinstance(layer, TrainableTokensLayer):
                for delta in layer.trainable_tokens_delta.values():
                    delta.add_(torch.randn_like(delta))
    layers = [m for m in lm.modules() if isinstance(m, TrainableTokensLayer)]
    assert layers

    def logits():
        with torch.no_grad():
            hidden, _ = lm(lm.embed(seg))
            return lm.logits(hidden)

    model.train()
    unmerged = logits()
    assert not any(layer.merged for layer in layers)
    with torch.inference_mode():
        model.eval()
        merged = logits()
    assert all(layer.merged for layer in layers)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    model.train()
    assert not any(layer.merged for layer in layers)
    hidden, _ = lm(lm.embed(seg))
    lm.logits(hidden).float().pow(2).mean().backward()  # the merge left no inference tensor behind
    assert any(layer.trainable_tokens_delta["default"].grad is not None for layer in layers)
    assert torch.allclose(logits(), unmerged, atol=1e-5)
