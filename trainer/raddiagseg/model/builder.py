"""Building a model: its tokenizer and pretrained component weights are read from files here, not in the
model's constructor, so `RadDiagSegModel(config, tokenizer)` only assembles modules and a checkpoint load
(`from_pretrained`) never reads the SAM / CLIP files its weights replace anyway.

The base LM is the exception: `LanguageModel` loads `config.lm_dir` while it is built, because LoRA
adapters must wrap the loaded Gemma-2 weights, not random ones.
"""

from __future__ import annotations

from raddiagseg.model import weights
from raddiagseg.model.config import RadDiagSegConfig, preset_config
from raddiagseg.model.raddiagseg import RadDiagSegModel
from raddiagseg.model.tokenizer import build_demo_tokenizer, load_tokenizer


def build_model(preset: str = "demo", **overrides) -> RadDiagSegModel:
    """A freshly initialised model from a named preset (`demo` or `paper`); `overrides` are config fields
    (e.g. sam_checkpoint=PTH, clip_dir=DIR, lm_dir=DIR for the paper's pretrained components)."""
    return build_from_config(preset_config(preset, **overrides))


def build_from_config(config: RadDiagSegConfig, tokenizer=None) -> RadDiagSegModel:
    """The model of `config` with its pretrained parts: the tokenizer of `config.lm_dir` (else the in-memory demo
    tokenizer), SAM/MedSAM weights from `config.sam_checkpoint`, BiomedCLIP from `config.clip_dir`."""
    if tokenizer is None:
        tokenizer = load_tokenizer(config.lm_dir) if config.lm_dir else build_demo_tokenizer(config.num_seg_tokens)
    model = RadDiagSegModel(config, tokenizer)
    if config.sam_checkpoint:
        weights.load_sam_checkpoint(config.sam_checkpoint, model.vision_backbone, model.mask_decoder)
    if config.clip_dir:
        weights.load_clip_folder(config.clip_dir, model.clip_encoder)
    return model
