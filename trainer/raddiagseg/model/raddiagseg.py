"""RadDiagSeg-M: vision backbone + multimodal LM (CLIP encoder, projector, Gemma-2) + seg-token mask decoder.

Follows paper 001 and LISA's recipe: the last-layer hidden state that *predicts* a seg token
(teacher forcing: the position before it; generation: the step that produced it) is projected
to a SAM prompt and decoded into one mask for that token.
"""

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raddiagseg.fileio import atomic_write
from raddiagseg.model.clip_encoder import ClipEncoder
from raddiagseg.model import generation
from raddiagseg.model.config import RadDiagSegConfig
from raddiagseg.model.generation import GenerationConfig
from raddiagseg.model.language_model import LanguageModel
from raddiagseg.model.mask_decoder import SegMaskDecoder
from raddiagseg.model.outputs import GenerationResult, ImageFeatures
from raddiagseg.model.processor import IGNORE_INDEX, RadDiagSegProcessor
from raddiagseg.model.projector import Projector
from raddiagseg.model.tokenizer import build_demo_tokenizer, load_tokenizer, special_token_ids
from raddiagseg.model.vision_backbone import VisionBackbone

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
COMPONENTS = ("vision_backbone", "clip_encoder", "projector", "language_model", "mask_decoder")


class RadDiagSegModel(nn.Module):
    def __init__(self, config: RadDiagSegConfig, tokenizer=None):
        """Assemble the components of `config` (pretrained weights and the tokenizer are read by
        `raddiagseg.model.builder`; `tokenizer` None is the in-memory demo tokenizer)."""
        super().__init__()
        self.config = config
        if tokenizer is None:
            if config.lm_dir:
                raise ValueError("a model with lm_dir needs that LM's tokenizer: build it with raddiagseg.build_model")
            tokenizer = build_demo_tokenizer(config.num_seg_tokens)
        ids = special_token_ids(tokenizer, config.num_seg_tokens)
        vocab_size = config.language.vocab_size or len(tokenizer)
        if vocab_size < len(tokenizer):
            raise ValueError(f"LM vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        config.language.vocab_size = vocab_size
        self.processor = RadDiagSegProcessor(tokenizer, config)

        self.vision_backbone = VisionBackbone(config.vision)
        self.clip_encoder = ClipEncoder(config.clip)
        self.projector = Projector(config.clip.embed_dim, config.language.hidden_size, config.projector.num_queries, config.projector.num_heads)
        self.language_model = LanguageModel(config.language, vocab_size, ids, weights_dir=config.lm_dir)
        self.mask_decoder = SegMaskDecoder(config.language.hidden_size, config.vision, config.mask_decoder)

        if config.trainable.lm == "lora" and config.language.lora_rank > 0:
            self.language_model.add_lora()
        self._apply_trainable()
        self.mask_decoder_calls = 0  # counted so callers/tests can see that no seg token means no decoder call
        # training under DeepSpeed ZeRO: run the mask decoder on every batch (weight 0 without masks), see forward
        self.decode_every_batch = False

    # --- parameters -------------------------------------------------------------------------
    def _apply_trainable(self):
        t = self.config.trainable
        for p in self.parameters():
            p.requires_grad_(False)
        for module, on in ((self.vision_backbone, t.vision), (self.clip_encoder, t.clip), (self.projector, t.projector)):
            module.requires_grad_(on)
        self.mask_decoder.mask_decoder.requires_grad_(t.mask_decoder)
        self.mask_decoder.text_to_prompt.requires_grad_(t.mask_decoder)
        # parameters our path never uses stay frozen (no dead optimiser state, no DDP "unused" surprises):
        # SAM's IoU head (our score is the mean mask probability) and the point/box/mask prompt encoders
        self.mask_decoder.mask_decoder.iou_prediction_head.requires_grad_(False)
        self.mask_decoder.prompt_encoder.no_mask_embed.requires_grad_(t.prompt_encoder)
        # RVLS2M feeds region masks through SAM's mask branch: it learns with the mask decoder
        self.mask_decoder.prompt_encoder.mask_downscaling.requires_grad_(bool(self.config.rvls2m.enabled and t.mask_decoder))
        if t.lm == "full":
            self.language_model.requires_grad_(True)
        elif t.lm == "lora":
            for name, p in self.language_model.named_parameters():
                p.requires_grad_("lora_" in name or "trainable_tokens_delta" in name)
        elif t.lm != "frozen":
            raise ValueError(f"trainable.lm must be 'lora', 'full' or 'frozen', not {t.lm!r}")

    def set_trainable(self, **flags):
        """Change what trains (fields of `TrainableConfig`, e.g. lm="lora", vision=False); saved with the config.

        Asking for lm="lora" on a model without adapters (the demo preset) adds LoRA now, rank
        `config.language.lora_rank` or 8, so a shipped demo model can be fine-tuned the paper's way.
        """
        import dataclasses

        known = {f.name for f in dataclasses.fields(self.config.trainable)}
        unknown = set(flags) - known
        if unknown:
            raise ValueError(f"unknown trainable flags {sorted(unknown)}; known: {sorted(known)}")
        trainable = dataclasses.replace(self.config.trainable, **flags)
        if trainable.lm == "lora" and not self.language_model.has_lora:
            if self.config.language.lora_rank <= 0:
                self.config.language.lora_rank = 8
            self.language_model.add_lora()
        self.config.trainable = trainable
        self._apply_trainable()

    def enable_gradient_checkpointing(self):
        """Recompute the LM's layer activations in backward (transformers' checkpointing): less memory, ~30 % slower."""
        self.language_model.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def set_frozen_dtype(self, dtype):
        """Parameters that do not train in `dtype` (bf16: the paper's frozen 2.6 B LM base in 5.2 GB instead of
        10.5 GB), trainable ones in fp32, the master weights AdamW updates (bf16 autocast still runs the matmuls in
        bf16). float32 makes every parameter fp32."""
        for p in self.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
        return self

    def trainable_parameters(self):
        """Parameters the optimiser should update (per `config.trainable`)."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self):
        """{component: (total, trainable)}; LoRA and seg-token deltas count under the language model."""
        counts = {}
        for name in COMPONENTS:
            params = list(getattr(self, name).parameters())
            counts[name] = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
        return counts

    def region_config(self, rvls2m=None):
        """The `RVLS2MConfig` to decode masks with, or None: `rvls2m` None follows the model config, True/False overrides it."""
        enabled = self.config.rvls2m.enabled if rvls2m is None else bool(rvls2m)
        if enabled and not self.config.rvls2m.enabled:
            log.warning("RVLS2M asked for at inference, but this model was not trained with it (config rvls2m.enabled is false)")
        return self.config.rvls2m if enabled else None

    def set_rvls2m(self, enabled=True, **settings):
        """Turn RVLS2M on/off in the config (grid, strategy, top_k may be changed too) before training; saved with the model."""
        import dataclasses

        from raddiagseg.model import rvls2m

        r = dataclasses.replace(self.config.rvls2m, enabled=bool(enabled), **settings)
        if r.strategy not in rvls2m.STRATEGIES:
            raise ValueError(f"RVLS2M strategy must be one of {rvls2m.STRATEGIES}, got {r.strategy!r}")
        if not 1 <= r.grid <= self.config.vision.embedding_size:
            raise ValueError(f"RVLS2M grid must be between 1 and {self.config.vision.embedding_size}, got {r.grid}")
        if r.strategy == "topk" and not 1 <= r.top_k <= r.grid * r.grid:
            raise ValueError(f"RVLS2M top_k must be between 1 and {r.grid * r.grid}, got {r.top_k}")
        self.config.rvls2m = r
        self._apply_trainable()

    def set_encoder_dtype(self, dtype):
        """Run the image encoders (vision backbone, CLIP encoder, projector) in `dtype`, the LM and mask
        decoder unchanged: on CPU bf16 speeds up the encoders' large matmuls while the demo LM's small,
        dispatch-bound decode steps are faster in fp32 (benchmarks/dtype.py). `dtype` then reports the
        encoders' dtype, the one cached ImageFeatures are kept in."""
        for module in (self.vision_backbone, self.clip_encoder, self.projector):
            module.to(dtype)
        return self

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return self.projector.queries.dtype

    # --- shared pieces ----------------------------------------------------------------------
    def _encode(self, vision_pixels, clip_pixels, latencies=None):
        t0 = time.perf_counter()
        # each encoder in its own dtype (`set_encoder_dtype` may run them in bf16 next to an fp32 LM)
        vision_dtype = _module_dtype(self.vision_backbone)
        vision = self.vision_backbone(self.vision_backbone.preprocess(vision_pixels.to(self.device)).to(vision_dtype))
        t1 = time.perf_counter()
        clip_dtype = _module_dtype(self.clip_encoder)
        patches = self.clip_encoder(self.clip_encoder.preprocess(clip_pixels.to(self.device)).to(clip_dtype))
        image_embeds = self.projector(patches.to(self.dtype))
        if latencies is not None:
            latencies["vision"] = t1 - t0
            latencies["clip"] = time.perf_counter() - t1
        return vision, image_embeds

    def input_embeds(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """LM input embeddings of `input_ids`, the image placeholder tokens replaced by the projected image tokens."""
        embeds = self.language_model.embed(input_ids)
        is_image = input_ids == self.processor.ids["image"]
        per_row = is_image.sum(1)
        if not torch.all(per_row == image_embeds.shape[1]):
            raise ValueError(f"each prompt needs exactly {image_embeds.shape[1]} image tokens, got {per_row.tolist()}")
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    # --- training ---------------------------------------------------------------------------
    def forward(self, batch):
        """Teacher-forced loss on a `processor.collate` batch -> {"loss", "loss_text", "loss_bce", "loss_dice", "n_masks"}."""
        from monai.losses import DiceLoss

        dev = self.device
        input_ids = batch["input_ids"].to(dev)
        labels = batch["labels"].to(dev)
        attention = batch["attention_mask"].to(dev)
        vision, image_embeds = self._encode(batch["vision"], batch["clip"])
        prefix = (labels == IGNORE_INDEX) & attention.bool()  # image + question (answer and padding excluded)
        hidden, _ = self.language_model(self.input_embeds(input_ids, image_embeds), attention_mask=attention, prefix_mask=prefix)

        # text: the state at t predicts label t+1
        targets = labels[:, 1:]
        predict = targets != IGNORE_INDEX
        logits = self.language_model.logits(hidden[:, :-1][predict])
        loss_text = F.cross_entropy(logits.float(), targets[predict])

        # masks: the state that predicts each seg token, in answer order, sample by sample
        is_seg = torch.isin(targets, torch.tensor(self.processor.ids["seg"], device=dev)) & predict
        b_index, t_index = is_seg.nonzero(as_tuple=True)
        gt = batch["masks"].to(dev).float()
        n_masks = int(b_index.numel())
        if n_masks != gt.shape[0]:
            raise ValueError(f"batch has {n_masks} seg tokens but {gt.shape[0]} masks")
        if n_masks:
            mask_index = batch["mask_image_index"].to(dev)
            if not torch.equal(mask_index, b_index):
                raise ValueError("masks are not in seg-token order (mask_image_index disagrees with the answers)")
            self.mask_decoder_calls += 1
            low_res = self.mask_decoder(vision, hidden[b_index, t_index], b_index, region=self.region_config())
            pred = F.interpolate(low_res[:, None].float(), size=gt.shape[-2:], mode="bilinear", align_corners=False)
            loss_bce = F.binary_cross_entropy_with_logits(pred[:, 0], gt, reduction="none").mean(dim=(1, 2)).mean()
            dice = DiceLoss(sigmoid=True, reduction="none")(pred, gt[:, None])
            loss_dice = dice.reshape(n_masks).mean()
        elif self.decode_every_batch and self.training:
            # ZeRO reduces gradients in buckets in the order backward produces them, so every rank must run the same
            # graph: without masks the decoder still runs (on the first state) and its gradients are exactly 0
            low_res = self.mask_decoder(vision, hidden[:1, 0], torch.zeros(1, dtype=torch.long, device=dev),
                                        region=self.region_config())
            loss_bce = loss_dice = 0.0 * low_res.float().sum()
        else:
            loss_bce = loss_dice = loss_text.new_zeros(())
        w = self.config.loss
        loss = w.text * loss_text + w.seg * (w.bce * loss_bce + w.dice * loss_dice)
        return {"loss": loss, "loss_text": loss_text, "loss_bce": loss_bce, "loss_dice": loss_dice, "n_masks": torch.tensor(n_masks)}

    # --- inference --------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images):
        """list of (H, W) arrays in [0, 1] -> ImageFeatures; pass it back via `features=` to skip the encoders."""
        t0 = time.perf_counter()
        pixels = self.processor.images(list(images))
        latencies = {"preprocess": time.perf_counter() - t0}
        with _eval_mode(self):
            vision, image_embeds = self._encode(pixels["vision"], pixels["clip"], latencies)
        return ImageFeatures(vision, image_embeds, [tuple(s) for s in pixels["image_sizes"].tolist()], latencies)

    def generate(self, image: np.ndarray | None, question: str, max_new_tokens: int = 128,
                 features: ImageFeatures | None = None, do_sample: bool = False, temperature: float = 1.0,
                 seed: int | None = None, rvls2m: bool | None = None, draft: Sequence[int] | None = None,
                 config: GenerationConfig | None = None) -> GenerationResult:
        """Answer `question` about one (H, W) image in [0, 1] -> GenerationResult (rvls2m, draft, config: see `generate_batch`)."""
        images = None if image is None else [image]
        if features is not None and len(features) != 1:
            raise ValueError(f"generate takes features of one image, got {len(features)}")
        drafts = None if draft is None else [draft]
        config = config or GenerationConfig(max_new_tokens, do_sample, temperature, seed, rvls2m)
        return self.generate_batch(images, [question], features, drafts=drafts, config=config)[0]

    @torch.inference_mode()
    def generate_batch(self, images: Sequence[np.ndarray] | None, questions: Sequence[str] | str,
                       features: ImageFeatures | Sequence[ImageFeatures] | None = None, max_new_tokens: int = 128,
                       do_sample: bool = False, temperature: float = 1.0, seed: int | None = None,
                       rvls2m: bool | None = None, drafts: Sequence[Sequence[int] | None] | None = None,
                       config: GenerationConfig | None = None) -> list[GenerationResult]:
        """Answer one question per image, decoding all together (left padding, KV cache) -> list[GenerationResult].

        config: a `GenerationConfig`; when given, it replaces the keywords max_new_tokens, do_sample, temperature,
        seed and rvls2m (kept for callers that pass them one by one).
        rvls2m: None decodes masks as the model was configured; True/False turns RVLS2M region prompts on/off.
        drafts: None, or per image a guess of the answer's token ids (e.g. `token_ids` of an earlier answer to the
        same question about the same image); greedy decoding then verifies the guess in the prefill pass and keeps
        what it would have generated anyway, so answers are the same (up to floating-point rounding: one pass instead of
        single steps, as with batching), only faster when the guess is right.
        `result.draft` says how many guessed tokens were kept. Ignored when sampling.
        """
        config = config or GenerationConfig(max_new_tokens, do_sample, temperature, seed, rvls2m)
        region = self.region_config(config.rvls2m)
        latencies = dict.fromkeys(generation.LATENCY_KEYS, 0.0)
        if features is not None and not isinstance(features, ImageFeatures):
            features = ImageFeatures.cat(features)  # a list of cached per-image features
        n_images = len(features) if features is not None else len(images or [])
        if isinstance(questions, str):
            questions = [questions] * n_images
        if len(questions) != n_images:
            raise ValueError(f"{len(questions)} questions for {n_images} images")
        for q in questions:
            self.processor.prompt_ids(q)  # refuse bad questions before any encoder runs
        if drafts is not None and len(drafts) != n_images:
            raise ValueError(f"{len(drafts)} drafts for {n_images} images")
        features = self.image_features(images, features, latencies)
        with _eval_mode(self):
            decoded = generation.decode(self, features, questions, config, drafts)
            latencies["prefill"], latencies["decode"] = decoded.prefill, decoded.decode
            latencies["decode_per_token"] = decoded.decode / decoded.steps if decoded.steps else 0.0  # one step: a token per unfinished row
            t0 = time.perf_counter()
            masks = generation.decode_masks(self, features, decoded.tokens, decoded.states, region)
            latencies["mask_decoder"] = time.perf_counter() - t0 if masks else 0.0
        results = [generation.build_result(self.processor, ids, masks.get(i, []), latencies) for i, ids in enumerate(decoded.tokens)]
        if drafts is not None:
            for result, accepted, offered in zip(results, decoded.accepted, decoded.offered):
                result.draft = {"offered": offered, "accepted": accepted}
        return results

    def image_features(self, images: Sequence[np.ndarray] | None, features: ImageFeatures | None,
                       latencies: dict | None = None) -> ImageFeatures:
        """`features` on the model's device and dtype, or the images encoded (their latencies added to `latencies`)."""
        if features is None:
            if not images:
                raise ValueError("give images or precomputed features")
            features = self.encode_images(images)
            if latencies is not None:
                latencies.update(features.latencies)
        return features.to(self.device, self.dtype)

    def generate_tts(self, image: np.ndarray | None, question: str, num_answers: int = 4, num_masks: int = 4,
                     temperature: float = 0.7, prompt_noise: float = 0.05, max_new_tokens: int = 128,
                     features: ImageFeatures | None = None, seed: int = 0, rvls2m: bool | None = None) -> GenerationResult:
        """Test-time scaling (paper 003): majority answer of `num_answers` paths, consensus mask of the
        perturbed prompts; `result.agreement` says how much they agreed. See `raddiagseg.model.tts`."""
        from raddiagseg.model.tts import TTSConfig, generate_tts

        sampling = GenerationConfig(max_new_tokens, do_sample=True, temperature=temperature, seed=seed, rvls2m=rvls2m)
        return generate_tts(self, image, question, TTSConfig(num_answers, num_masks, prompt_noise), sampling, features)

    # --- checkpoints ------------------------------------------------------------------------
    def save_pretrained(self, path, dtype=None):
        """Write a checkpoint folder: config.json + model.safetensors (optionally cast, e.g. torch.float16) + tokenizer."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = _dedupe_tied(self.state_dict())
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}
        atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "raddiagseg": str(FORMAT_VERSION)}))
        config = {"model_type": "raddiagseg", "format_version": FORMAT_VERSION, **self.config.to_dict()}
        atomic_write(path / CONFIG_FILE, json.dumps(config, indent=2))
        self.processor.tokenizer.save_pretrained(str(path))
        counts = self.parameter_counts()
        card = [f"# RadDiagSeg-M ({self.config.preset} preset)", "", "| component | parameters |", "|---|---|"]
        card += [f"| {name} | {total:,} |" for name, (total, _) in counts.items()]
        card += ["", "Load with `raddiagseg.load_model(path)`."]
        atomic_write(path / "MODEL_CARD.md", "\n".join(card) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, frozen_dtype=None):
        """Load a checkpoint folder; `dtype` casts every parameter, `frozen_dtype` (for training) only those that
        do not train (`set_frozen_dtype`: the model is built in it, the trainable ones read into fp32)."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a RadDiagSeg checkpoint folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        data = json.loads((path / CONFIG_FILE).read_text())
        if data.pop("model_type", None) != "raddiagseg":
            raise ValueError(f"{path / CONFIG_FILE} is not a RadDiagSeg config (model_type != 'raddiagseg')")
        version = data.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"checkpoint format {version} is newer than this raddiagseg understands ({FORMAT_VERSION})")
        config = RadDiagSegConfig.from_dict(data)
        previous = torch.get_default_dtype()
        build_dtype = frozen_dtype or dtype
        if build_dtype is not None and build_dtype.is_floating_point:
            torch.set_default_dtype(build_dtype)  # build in the target dtype: a bf16 paper model never exists in fp32
        try:
            model = cls(config, tokenizer=load_tokenizer(path))
        finally:
            torch.set_default_dtype(previous)
        if frozen_dtype is not None:
            model.set_frozen_dtype(frozen_dtype)
        expected = model.state_dict()
        tied = set(expected) - set(_dedupe_tied(expected))
        from raddiagseg.model.weights import check_state_dict, copy_safetensors_into, safetensors_header

        # tensor by tensor from the file straight into the model (no memory map): peak memory is the model
        # plus at most one tensor, not two copies of the model (matters for the 2.6 B-parameter paper preset)
        header, _ = safetensors_header(path / WEIGHTS_FILE)
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        check_state_dict({k: v for k, v in expected.items() if k not in tied}, shapes, source=str(path / WEIGHTS_FILE))
        with torch.no_grad():
            copy_safetensors_into(path / WEIGHTS_FILE, {k: expected[k] for k in shapes})  # casts to the model's dtype
        model.to(device=device, dtype=dtype)
        model.eval()
        return model


def _module_dtype(module):
    return next(module.parameters()).dtype


def _dedupe_tied(state):
    """Drop tensors that share storage with an earlier key (tied LM head), so safetensors can save them."""
    seen, out = set(), {}
    for key, value in state.items():
        ident = (value.device.type, value.untyped_storage().data_ptr() if value.device.type != "meta" else id(value), value.storage_offset(), tuple(value.shape))
        if value.device.type != "meta" and ident in seen:
            continue
        seen.add(ident)
        out[key] = value
    return out


class _eval_mode:
    """Context manager: eval mode inside, the previous train/eval mode restored after."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        if self.was_training:  # eval() walks every module (and merges the seg rows): only when it changes something
            self.module.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.module.train(True)
