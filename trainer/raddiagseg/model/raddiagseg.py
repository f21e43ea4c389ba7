"""RadDiagSeg-M: vision backbone + multimodal LM (CLIP encoder, projector, Gemma-2) + seg-token mask decoder.

Follows paper 001 and LISA's recipe: the last-layer hidden state that *predicts* a seg token
(teacher forcing: the position before it; generation: the step that produced it) is projected
to a SAM prompt and decoded into one mask for that token.
"""

import json
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from raddiagseg.answers import token_labels
from raddiagseg.model.clip_encoder import ClipEncoder
from raddiagseg.model.config import RadDiagSegConfig
from raddiagseg.model.language_model import LanguageModel
from raddiagseg.model.mask_decoder import SegMaskDecoder
from raddiagseg.model.outputs import GenerationResult, ImageFeatures, SegmentResult
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
        super().__init__()
        from raddiagseg.model import weights

        self.config = config
        if tokenizer is None:
            tokenizer = load_tokenizer(config.lm_dir) if config.lm_dir else build_demo_tokenizer(config.num_seg_tokens)
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

        if config.sam_checkpoint:
            weights.load_sam_checkpoint(config.sam_checkpoint, self.vision_backbone, self.mask_decoder)
        if config.clip_dir:
            weights.load_clip_folder(config.clip_dir, self.clip_encoder)
        if config.trainable.lm == "lora" and config.language.lora_rank > 0:
            self.language_model.add_lora()
        self._apply_trainable()
        self.mask_decoder_calls = 0  # counted so callers/tests can see that no seg token means no decoder call

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

    def _input_embeds(self, input_ids, image_embeds):
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
        hidden, _ = self.language_model(self._input_embeds(input_ids, image_embeds), attention_mask=attention, prefix_mask=prefix)

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

    def generate(self, image, question, max_new_tokens=128, features=None, do_sample=False, temperature=1.0, seed=None,
                 rvls2m=None, draft=None):
        """Answer `question` about one (H, W) image in [0, 1] -> GenerationResult (rvls2m, draft: see `generate_batch`)."""
        images = None if image is None else [image]
        if features is not None and len(features) != 1:
            raise ValueError(f"generate takes features of one image, got {len(features)}")
        drafts = None if draft is None else [draft]
        return self.generate_batch(images, [question], features, max_new_tokens, do_sample, temperature, seed, rvls2m, drafts)[0]

    @torch.inference_mode()
    def generate_batch(self, images, questions, features=None, max_new_tokens=128, do_sample=False, temperature=1.0, seed=None,
                       rvls2m=None, drafts=None):
        """Answer one question per image, decoding all together (left padding, KV cache) -> list[GenerationResult].

        rvls2m: None decodes masks as the model was configured; True/False turns RVLS2M region prompts on/off.
        drafts: None, or per image a guess of the answer's token ids (e.g. `token_ids` of an earlier answer to the
        same question about the same image); greedy decoding then verifies the guess in the prefill pass and keeps
        what it would have generated anyway, so answers are the same (up to floating-point rounding: one pass instead of
        single steps, as with batching), only faster when the guess is right.
        `result.draft` says how many guessed tokens were kept. Ignored when sampling.
        """
        region = self.region_config(rvls2m)
        latencies = dict.fromkeys(("preprocess", "vision", "clip", "prefill", "decode", "mask_decoder"), 0.0)
        if features is not None and not isinstance(features, ImageFeatures):
            features = ImageFeatures.cat(features)  # a list of cached per-image features
        n_images = len(features) if features is not None else len(images or [])
        if isinstance(questions, str):
            questions = [questions] * n_images
        if len(questions) != n_images:
            raise ValueError(f"{len(questions)} questions for {n_images} images")
        for q in questions:
            self.processor.prompt_ids(q)  # refuse bad questions before any encoder runs
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if drafts is not None and len(drafts) != n_images:
            raise ValueError(f"{len(drafts)} drafts for {n_images} images")
        if features is None:
            if not images:
                raise ValueError("give images or precomputed features")
            features = self.encode_images(images)
            latencies.update(features.latencies)
        features = features.to(self.device, self.dtype)
        with _eval_mode(self):
            decoded = self._decode(features, questions, max_new_tokens, do_sample, temperature, seed, drafts)
            latencies["prefill"], latencies["decode"] = decoded.prefill, decoded.decode
            latencies["decode_per_token"] = decoded.decode / decoded.steps if decoded.steps else 0.0  # one step: a token per unfinished row
            t0 = time.perf_counter()
            masks = self._masks(features, decoded.tokens, decoded.states, region)
            latencies["mask_decoder"] = time.perf_counter() - t0 if masks else 0.0
        results = [self._result(i, decoded.tokens[i], masks.get(i, []), latencies) for i in range(len(decoded.tokens))]
        if drafts is not None:
            for result, accepted, offered in zip(results, decoded.accepted, decoded.offered):
                result.draft = {"offered": offered, "accepted": accepted}
        return results

    def generate_tts(self, image, question, num_answers=4, num_masks=4, temperature=0.7, prompt_noise=0.05,
                     max_new_tokens=128, features=None, seed=0, rvls2m=None):
        """Test-time scaling (paper 003): majority answer of `num_answers` paths, consensus mask of the
        perturbed prompts; `result.agreement` says how much they agreed. See `raddiagseg.model.tts`."""
        from raddiagseg.model.tts import generate_tts

        return generate_tts(self, image, question, num_answers, num_masks, temperature, prompt_noise, max_new_tokens, features, seed,
                            rvls2m=rvls2m)

    def _decode(self, features, questions, max_new_tokens, do_sample, temperature, seed, drafts=None):
        """KV-cached decoding -> `Decoded`: per sample the generated ids (eos dropped) and the hidden state that
        produced each, prefill and decode seconds, decode steps and how many draft tokens were accepted.

        `drafts` (greedy only): per sample a guess of the answer's token ids, e.g. the answer the model gave
        before to the same question about the same slice. The guess is fed after the prompt in the prefill
        pass, and each token is kept only while it is the argmax of the state before it, exactly as greedy
        decoding would have chosen it (speculative decoding with a cached draft); decoding goes on step by
        step from the first token that differs. A right guess turns ~25 decode steps into one pass."""
        proc = self.processor
        prompts = [proc.prompt_ids(q) for q in questions]
        batch, length = len(prompts), max(len(p) for p in prompts)
        eos = proc.ids["eos"]
        vocab = self.config.language.vocab_size
        guesses = _draft_rows(drafts, batch, eos, max_new_tokens, proc.ids["image"], vocab) if drafts is not None and not do_sample else [[]] * batch
        if length + max(map(len, guesses)) > (self.language_model.causal_lm.config.sliding_window or 1 << 30):
            guesses = [[]] * batch  # the rollback below assumes the whole sequence fits in the sliding window
        width = max(map(len, guesses))
        dev = self.device
        input_ids = torch.full((batch, length + width), proc.ids["pad"], dtype=torch.long, device=dev)
        attention = torch.zeros((batch, length + width), dtype=torch.long, device=dev)
        for b, (p, g) in enumerate(zip(prompts, guesses)):  # prompts left-padded, draft tokens right after them
            input_ids[b, length - len(p) : length + len(g)] = torch.tensor(p + g, device=dev)
            attention[b, length - len(p) : length + len(g)] = 1
        prompt_mask = attention.bool()
        prompt_mask[:, length:] = False  # the whole prompt is the prefix; draft tokens are causal like generated ones
        position_ids = (attention.cumsum(1) - 1).clamp_min(0)
        generator = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None

        t0 = time.perf_counter()
        hidden, cache = self.language_model(
            self._input_embeds(input_ids, features.image_embeds), attention_mask=attention, position_ids=position_ids, use_cache=True,
            prefix_mask=prompt_mask,
        )
        tokens, states = [[] for _ in range(batch)], [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool, device=dev)
        accepted = [0] * batch
        last_index = torch.full((batch,), length - 1, dtype=torch.long, device=dev)
        for b, guess in enumerate(guesses):
            if not guess:
                continue
            chosen = self.language_model.logits(hidden[b, length - 1 : length - 1 + len(guess)]).float().argmax(-1).tolist()
            while accepted[b] < len(guess) and chosen[accepted[b]] == guess[accepted[b]]:
                token = guess[accepted[b]]
                if token == eos:
                    done[b] = True
                else:
                    tokens[b].append(token)
                    states[b].append(hidden[b, length - 1 + accepted[b]])
                accepted[b] += 1
                if done[b]:
                    break
            if len(tokens[b]) >= max_new_tokens:
                done[b] = True
            attention[b, length + accepted[b] :] = 0  # rejected draft tokens stay in the cache, masked out
            last_index[b] += accepted[b]
        t_prefill = time.perf_counter() - t0
        rows = torch.arange(batch, device=dev)
        last = hidden[rows, last_index]
        position = position_ids[rows, last_index][:, None]
        t0 = time.perf_counter()
        steps = 0
        while not bool(done.all()):
            steps += 1
            logits = self.language_model.logits(last).float()
            if do_sample:
                probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                next_ids = logits.argmax(-1)
            for b in range(batch):
                if not done[b]:
                    if next_ids[b].item() == eos:
                        done[b] = True
                    else:
                        tokens[b].append(next_ids[b].item())
                        states[b].append(last[b])
                        done[b] = len(tokens[b]) >= max_new_tokens
            if bool(done.all()):
                break
            next_ids = torch.where(done, torch.full_like(next_ids, proc.ids["pad"]), next_ids)
            attention = torch.cat([attention, (~done).long()[:, None]], dim=1)
            position = position + 1
            hidden, cache = self.language_model(
                self.language_model.embed(next_ids[:, None]), attention_mask=attention, position_ids=position, past_key_values=cache, use_cache=True
            )
            last = hidden[:, -1]
        return Decoded(tokens, states, t_prefill, time.perf_counter() - t0, steps, accepted, [len(g) for g in guesses])

    def _masks(self, features, ids, states, region=None):
        """One bool mask per generated seg token at its image's original size; no decoder call without seg tokens."""
        seg = self.processor.seg_id_to_index
        picks = [(b, k) for b, row in enumerate(ids) for k, t in enumerate(row) if t in seg]
        if not picks:
            return {}
        self.mask_decoder_calls += 1
        hidden = torch.stack([states[b][k] for b, k in picks])
        image_index = torch.tensor([b for b, _ in picks], device=self.device)
        low_res = self.mask_decoder(features.vision, hidden, image_index, region=region).float()
        out = {}
        for j, (b, _) in enumerate(picks):
            h, w = features.image_sizes[b]
            prob = torch.sigmoid(F.interpolate(low_res[j][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0])
            mask = prob > self.config.mask_threshold
            score = float(prob[mask].mean()) if bool(mask.any()) else 0.0
            out.setdefault(b, []).append((mask.cpu().numpy(), score))
        return out

    def _decode_text(self, ids):
        """Answer text of generated ids, seg tokens kept verbatim (bos/pad/image placeholders dropped)."""
        proc = self.processor
        hidden_ids = {proc.ids["bos"], proc.ids["pad"], proc.ids["image"]}
        kept = [t for t in ids if t not in hidden_ids]
        return proc.tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _result(self, b, ids, masks, latencies):
        text = self._decode_text(ids)
        labels = token_labels(text)
        if len(labels) != len(masks):
            log.warning("answer text has %d seg tokens but %d were generated", len(labels), len(masks))
        segments = [SegmentResult(label=label, token=token, mask=mask, score=score)
                    for (label, token), (mask, score) in zip(labels, masks)]
        return GenerationResult(answer=text, segments=segments, latencies=dict(latencies), token_ids=list(ids))

    # --- checkpoints ------------------------------------------------------------------------
    def save_pretrained(self, path, dtype=None):
        """Write a checkpoint folder: config.json + model.safetensors (optionally cast, e.g. torch.float16) + tokenizer."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = _dedupe_tied(self.state_dict())
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}
        _atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "raddiagseg": str(FORMAT_VERSION)}))
        config = {"model_type": "raddiagseg", "format_version": FORMAT_VERSION, **self.config.to_dict()}
        _atomic_write(path / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        self.processor.tokenizer.save_pretrained(str(path))
        counts = self.parameter_counts()
        card = [f"# RadDiagSeg-M ({self.config.preset} preset)", "", "| component | parameters |", "|---|---|"]
        card += [f"| {name} | {total:,} |" for name, (total, _) in counts.items()]
        card += ["", "Load with `raddiagseg.load_model(path)`."]
        _atomic_write(path / "MODEL_CARD.md", lambda tmp: tmp.write_text("\n".join(card) + "\n"))
        return path

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
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
        if dtype is not None and dtype.is_floating_point:
            torch.set_default_dtype(dtype)  # build in the target dtype: a bf16 paper model never exists in fp32
        try:
            model = cls(config, tokenizer=load_tokenizer(path))
        finally:
            torch.set_default_dtype(previous)
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


class Decoded(NamedTuple):
    tokens: list  # per sample: generated token ids, eos dropped
    states: list  # per sample: the hidden state that produced each token
    prefill: float  # seconds of the prompt (+ draft) pass
    decode: float  # seconds of the step-by-step decoding after it
    steps: int  # decode steps taken (0 when the drafts were accepted to the end)
    accepted: list  # per sample: draft tokens accepted, eos included
    offered: list  # per sample: draft tokens verified, eos included (0: no draft)


def _draft_rows(drafts, batch, eos, max_new_tokens, image_id, vocab_size):
    """Per sample the tokens to verify: the draft cut at its first token that cannot be generated (image
    placeholder, outside the vocabulary), then eos when there is room for one more step."""
    if len(drafts) != batch:
        raise ValueError(f"{len(drafts)} drafts for {batch} questions")
    rows = []
    for draft in drafts:
        row = []
        for token in list(draft or [])[:max_new_tokens]:
            token = int(token)
            if token == image_id or not 0 <= token < vocab_size:
                break
            row.append(token)
        if row and len(row) < max_new_tokens and row[-1] != eos:
            row.append(eos)
        rows.append(row)
    return rows


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


def _atomic_write(target, write):
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


class _eval_mode:
    """Context manager: eval mode inside, the previous train/eval mode restored after."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)
