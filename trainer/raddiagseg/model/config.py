"""RadDiagSeg-M configuration: one dataclass per component plus the `demo` and `paper` presets.

Every size is written here by hand (nothing is fetched from a hub) so that a checkpoint's
`config.json` alone rebuilds the exact architecture.
"""

import dataclasses
from dataclasses import dataclass, field

from raddiagseg import templates


@dataclass
class VisionConfig:
    """SAM `ImageEncoderViT` (the MedSAM vision backbone): pixel features for the mask decoder."""

    image_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple = (2, 5, 8, 11)
    use_rel_pos: bool = True
    out_chans: int = 256  # = prompt embedding dim of the mask decoder

    @property
    def embedding_size(self):
        return self.image_size // self.patch_size


@dataclass
class ClipConfig:
    """BiomedCLIP's vision trunk (timm VisionTransformer, ViT-B/16): patch tokens for the LM."""

    image_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # OpenAI CLIP normalisation, as BiomedCLIP's open_clip preprocess config uses
    mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    std: tuple = (0.26862954, 0.26130258, 0.27577711)

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ProjectorConfig:
    """2-layer MLP on the embedding dim, then Perceiver cross-attention with learnable queries on the token dim."""

    num_queries: int = 256
    num_heads: int = 8


@dataclass
class LanguageConfig:
    """Gemma-2 decoder (the LM of PaliGemma2-3b-pt-224) and how it is adapted."""

    vocab_size: int = 257216
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: int = 256
    sliding_window: int = 4096
    max_position_embeddings: int = 8192
    final_logit_softcapping: float = 30.0
    attn_logit_softcapping: float = 50.0
    rms_norm_eps: float = 1e-6
    prefix_attention: bool = False  # PaliGemma's prefix-LM: image + question attend bidirectionally; answer causal
    attn_implementation: str = "eager"  # transformers supports only eager (or flash/flex) for Gemma-2
    lora_rank: int = 8  # 0 = no LoRA adapters
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class MaskDecoderConfig:
    """SAM `PromptEncoder` + `MaskDecoder` (TwoWayTransformer) prompted by a projected LM hidden state."""

    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16


@dataclass
class RVLS2MConfig:
    """Region-aware vision-language similarity to mask (paper 003, `raddiagseg.model.rvls2m`).

    Off by default, so checkpoints saved before this option existed load unchanged. On: each seg
    token's region mask (the τ strategy over a grid x grid pooling of its similarity map) is the
    dense prompt of the SAM decoder, in training and in inference.
    """

    enabled: bool = False
    grid: int = 16  # g: cells per side (the paper's best: 16 x 16 over a 64 x 64 token map)
    strategy: str = "topk"  # "topk" (the top_k most similar cells) | "mean" (cells above the mean)
    top_k: int = 36  # paper 003 Figure 6: 12-36 cells of 16 x 16 work best


@dataclass
class TrainableConfig:
    """Which parts learn. The paper freezes the pretrained encoders and the LM base (LoRA instead)."""

    vision: bool = False
    clip: bool = False
    lm: str = "lora"  # "lora" (adapters + seg-token rows) | "full" | "frozen" (seg-token rows only)
    projector: bool = True
    mask_decoder: bool = True  # MaskDecoder + the LM->prompt projection
    prompt_encoder: bool = False


@dataclass
class LossConfig:
    """L = text·CE + seg·(bce·BCE + dice·Dice) (LISA's loss and weights: text 1.0, seg 1.0, bce 2.0, dice 0.5)."""

    text: float = 1.0
    seg: float = 1.0
    bce: float = 2.0
    dice: float = 0.5


@dataclass
class RadDiagSegConfig:
    preset: str = "paper"
    vision: VisionConfig = field(default_factory=VisionConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rvls2m: RVLS2MConfig = field(default_factory=RVLS2MConfig)
    num_seg_tokens: int = templates.NUM_SEG_TOKENS
    max_question_tokens: int = 256
    max_answer_tokens: int = 256
    mask_loss_size: int = 256  # GT and predicted masks are compared at this square size in training
    mask_threshold: float = 0.5
    # Local weight sources, used only while building; a saved checkpoint carries the weights itself.
    sam_checkpoint: str | None = None
    clip_dir: str | None = None
    lm_dir: str | None = None

    def to_dict(self):
        data = dataclasses.asdict(self)
        for key in ("sam_checkpoint", "clip_dir", "lm_dir"):
            data.pop(key)
        return data

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        sections = {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default_factory)}
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data.pop(f.name)
            if f.name in sections:
                kwargs[f.name] = _section_from_dict(f.default_factory, value)
            else:
                kwargs[f.name] = value
        if data:
            raise ValueError(f"unknown config keys: {sorted(data)}")
        return cls(**kwargs)


def _section_from_dict(factory, value):
    known = {f.name: f for f in dataclasses.fields(factory)}
    unknown = set(value) - set(known)
    if unknown:
        raise ValueError(f"unknown {factory.__name__} keys: {sorted(unknown)}")
    defaults = factory()
    cast = {k: tuple(v) if isinstance(getattr(defaults, k), tuple) else v for k, v in value.items()}
    return factory(**cast)


def demo_config():
    """Small sizes that train from scratch on phantoms on 2 CPU cores (everything trainable)."""
    return RadDiagSegConfig(
        preset="demo",
        vision=VisionConfig(
            image_size=256, patch_size=16, embed_dim=128, depth=4, num_heads=4, window_size=0,
            global_attn_indexes=(), use_rel_pos=True, out_chans=128,  # 128-d prompts: 4x cheaper decoder
        ),
        clip=ClipConfig(image_size=224, patch_size=16, embed_dim=128, depth=2, num_heads=4),  # 224: lesions span >= 1 patch
        projector=ProjectorConfig(num_queries=16, num_heads=4),
        language=LanguageConfig(
            vocab_size=0,  # set from the demo tokenizer
            hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=1024,
            max_position_embeddings=1024, final_logit_softcapping=30.0, attn_logit_softcapping=None,
            attn_implementation="eager", lora_rank=0, prefix_attention=True,
        ),
        mask_decoder=MaskDecoderConfig(transformer_depth=2, transformer_mlp_dim=512, transformer_heads=8, iou_head_hidden_dim=128),
        trainable=TrainableConfig(vision=True, clip=True, lm="full", projector=True, mask_decoder=True, prompt_encoder=True),
        rvls2m=RVLS2MConfig(enabled=False, grid=8, top_k=8),  # 16 x 16 token map: 8 x 8 cells of 2 x 2 tokens
        max_question_tokens=192,
        max_answer_tokens=128,
        mask_loss_size=256,
    )


def paper_config():
    """RadDiagSeg-M as in paper 001: MedSAM ViT-B 1024, BiomedCLIP ViT-B/16 224, PaliGemma2-3b-pt-224 LM, 256 image tokens."""
    return RadDiagSegConfig(preset="paper", language=LanguageConfig(prefix_attention=True))


PRESETS = {"demo": demo_config, "paper": paper_config}


def preset_config(name="demo", **overrides):
    """The config of preset `name`; keyword overrides replace top-level fields (e.g. `sam_checkpoint=PATH`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"unknown model option {key!r}")
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(config, key)):
            value = dataclasses.replace(getattr(config, key), **value)
        setattr(config, key, value)
    return config
