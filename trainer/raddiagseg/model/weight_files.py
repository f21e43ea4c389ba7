"""Random weights written in the real files' formats: a MedSAM/SAM `.pth`, an open_clip BiomedCLIP folder, a
PaliGemma2 Hugging Face folder with its tokenizer.

Why: the paper preset's first real run (download the weights, `raddiagseg train --preset paper ...`) can be
rehearsed end to end, at full size or at any smaller size, without downloading anything; the files go
through the same loaders (`raddiagseg.model.weights`) as the real ones.

The PaliGemma2 folder is streamed shard by shard (`model-0000k-of-0000n.safetensors` + the index, keys
`language_model.model.*` as in the hub files, bf16 as they are shipped), so writing the 2.6 B-parameter LM
needs one shard in memory, not the model. Its SigLIP tower is not written: the loaders skip it. Its tokenizer
is our byte-level BPE with PaliGemma's special tokens (`<image>`, `<seg000>` ... `<seg127>`), not the
257k-piece SentencePiece model; the LM's vocabulary size is the real one.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

PALIGEMMA_SEG_TOKENS = 128  # PaliGemma's tokenizer holds <seg000> ... <seg127>
SHARD_BYTES = 1 << 30


def sam_sized_like(vision, decoder):
    """A segment-anything `Sam` with the sizes of our config (the layout of a MedSAM checkpoint)."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = vision.image_size // vision.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=vision.image_size, patch_size=vision.patch_size, embed_dim=vision.embed_dim, depth=vision.depth,
            num_heads=vision.num_heads, mlp_ratio=vision.mlp_ratio, out_chans=vision.out_chans, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=vision.use_rel_pos,
            window_size=vision.window_size, global_attn_indexes=tuple(vision.global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=vision.out_chans, image_embedding_size=(grid, grid),
            input_image_size=(vision.image_size, vision.image_size), mask_in_chans=decoder.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=decoder.num_multimask_outputs,
            transformer=TwoWayTransformer(depth=decoder.transformer_depth, embedding_dim=vision.out_chans,
                                          mlp_dim=decoder.transformer_mlp_dim, num_heads=decoder.transformer_heads),
            transformer_dim=vision.out_chans, iou_head_depth=3, iou_head_hidden_dim=decoder.iou_head_hidden_dim,
        ),
    )


def write_sam_checkpoint(path, vision, decoder, seed=0, wrapped=False):
    """A MedSAM-style `.pth` (plain SAM state dict; `wrapped`: a training checkpoint `{"model": {"module.*"}}`) -> Sam."""
    torch.manual_seed(seed)
    sam = sam_sized_like(vision, decoder)
    state = sam.state_dict()
    if wrapped:
        state = {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return sam


def write_open_clip_folder(folder, clip, seed=0):
    """An open_clip folder like BiomedCLIP's: config JSON + `visual.trunk.*` / `visual.head.proj` / `text.*` weights
    -> the timm trunk written."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    trunk = VisionTransformer(img_size=clip.image_size, patch_size=clip.patch_size, embed_dim=clip.embed_dim,
                              depth=clip.depth, num_heads=clip.num_heads, mlp_ratio=clip.mlp_ratio, num_classes=0,
                              global_pool="")
    state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    state["visual.head.proj.weight"] = torch.randn(64, clip.embed_dim)
    state["text.transformer.embeddings.word_embeddings.weight"] = torch.randn(10, 8)
    state["logit_scale"] = torch.tensor(4.6)
    folder = Path(folder)
    folder.mkdir(parents=True)
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    config = {
        "model_cfg": {"embed_dim": 64, "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                                                        "timm_pool": "", "timm_proj": "linear", "image_size": clip.image_size}},
        "preprocess_cfg": {"mean": list(clip.mean), "std": list(clip.std)},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return trunk


def paligemma_style_tokenizer():
    """Our byte-level BPE with PaliGemma's special tokens: `<image>` and `<seg000>` ... `<seg127>`."""
    from raddiagseg import templates
    from raddiagseg.model.tokenizer import build_demo_tokenizer

    tokenizer = build_demo_tokenizer(templates.NUM_SEG_TOKENS)  # <seg000>.. as many as our answers use
    extra = [f"<seg{i:03d}>" for i in range(templates.NUM_SEG_TOKENS, PALIGEMMA_SEG_TOKENS)]
    tokenizer.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    return tokenizer


def _text_config(language, vocab_size):
    lm = language
    return dict(model_type="gemma2", vocab_size=vocab_size, hidden_size=lm.hidden_size,
                intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_hidden_layers,
                num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_key_value_heads,
                head_dim=lm.head_dim, query_pre_attn_scalar=lm.query_pre_attn_scalar, sliding_window=lm.sliding_window,
                final_logit_softcapping=lm.final_logit_softcapping, attn_logit_softcapping=lm.attn_logit_softcapping,
                rms_norm_eps=lm.rms_norm_eps, max_position_embeddings=lm.max_position_embeddings)


def _random_tensor(name, shape, dtype, seed):
    """N(0, 0.02) for weights, zeros for Gemma's (1 + w) RMS norms; seeded by the key, so any shard order gives the same file."""
    if name.endswith("norm.weight"):
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def write_paligemma_folder(folder, language, tokenizer=None, seed=0, dtype=torch.bfloat16, shard_bytes=SHARD_BYTES):
    """A PaliGemma2 HF folder: config.json (text + vision config), the Gemma-2 LM as sharded safetensors with
    `model.safetensors.index.json`, the tokenizer -> the folder. One shard in memory at a time."""
    from safetensors.torch import save_file
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from raddiagseg.model.tokenizer import special_token_ids

    tokenizer = tokenizer or paligemma_style_tokenizer()
    vocab_size = language.vocab_size or len(tokenizer)
    text = _text_config(language, vocab_size)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Gemma2ForCausalLM(Gemma2Config(**text)).state_dict().items()
                  if k != "lm_head.weight"}  # tied to embed_tokens, as in the hub files
    folder = Path(folder)
    folder.mkdir(parents=True)
    groups, current, size = [], [], 0
    item = torch.tensor([], dtype=dtype).element_size()
    for key, shape in shapes.items():
        nbytes = item * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    groups.append(current)
    weight_map = {}
    for i, keys in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {f"language_model.{k}": _random_tensor(k, shapes[k], dtype, seed) for k in keys}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        del shard
    total = sum(item * int(torch.Size(s).numel()) for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    image_id = special_token_ids(tokenizer, 1)["image"]
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, patch_size=14, image_size=224, projection_dim=language.hidden_size)
    config = {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
              "image_token_index": image_id, "projection_dim": language.hidden_size, "hidden_size": 2048,
              "text_config": text, "vision_config": vision, "torch_dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(folder))
    return folder


def folder_bytes(path):
    """Bytes of a file or of every file under a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
