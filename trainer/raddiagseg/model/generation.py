"""Generation: KV-cached answer decoding (with optional cached drafts), one mask per seg token, the result.

`RadDiagSegModel.generate` / `generate_batch` and test-time scaling (`raddiagseg.model.tts`) compose these
pieces: `decode` (answer token ids and the hidden state that produced each), `decode_masks` (the mask decoder
on the states of seg tokens), `mask_and_score` (a probability map to a bool mask and its score),
`answer_text` and `build_result`. A `GenerationConfig` carries the generation settings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raddiagseg.answers import token_labels
from raddiagseg.model import static_decode
from raddiagseg.model.outputs import GenerationResult, ImageFeatures, SegmentResult

if TYPE_CHECKING:
    from raddiagseg.model.processor import RadDiagSegProcessor
    from raddiagseg.model.raddiagseg import RadDiagSegModel

log = logging.getLogger(__name__)
LATENCY_KEYS = ("preprocess", "vision", "clip", "prefill", "decode", "mask_decoder")


@dataclass(frozen=True)
class GenerationConfig:
    """How answers are decoded: greedy unless `do_sample` (softmax at `temperature`, torch generator seeded with
    `seed`); `rvls2m` None decodes masks as the model was configured, True/False turns RVLS2M region prompts on/off."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    seed: int | None = None
    rvls2m: bool | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")


class Decoded(NamedTuple):
    tokens: list  # per sample: generated token ids, eos dropped
    states: list  # per sample: the hidden state that produced each token
    prefill: float  # seconds of the prompt (+ draft) pass
    decode: float  # seconds of the step-by-step decoding after it
    steps: int  # decode steps taken (0 when the drafts were accepted to the end)
    accepted: list  # per sample: draft tokens accepted, eos included
    offered: list  # per sample: draft tokens verified, eos included (0: no draft)


@dataclass
class _Rows:
    """The decoding state of a batch: what each row generated so far and where it stands."""

    tokens: list
    states: list
    done: torch.Tensor
    attention: torch.Tensor
    last_index: torch.Tensor  # position of each row's last kept token
    accepted: list

    def keep(self, b: int, token: int, state: torch.Tensor, eos: int, max_new_tokens: int):
        """Append a generated token (eos ends the row; so does reaching max_new_tokens)."""
        if token == eos:
            self.done[b] = True
            return
        self.tokens[b].append(token)
        self.states[b].append(state)
        self.done[b] = len(self.tokens[b]) >= max_new_tokens


def decode(model: RadDiagSegModel, features: ImageFeatures, questions: Sequence[str], config: GenerationConfig,
           drafts: Sequence[Sequence[int] | None] | None = None) -> Decoded:
    """KV-cached decoding -> `Decoded`: per sample the generated ids (eos dropped) and the hidden state that
    produced each, prefill and decode seconds, decode steps and how many draft tokens were accepted.

    `drafts` (greedy only): per sample a guess of the answer's token ids, e.g. the answer the model gave
    before to the same question about the same slice. The guess is fed after the prompt in the prefill
    pass, and each token is kept only while it is the argmax of the state before it, exactly as greedy
    decoding would have chosen it (speculative decoding with a cached draft); decoding goes on step by
    step from the first token that differs. A right guess turns ~25 decode steps into one pass."""
    proc = model.processor
    prompts = [proc.prompt_ids(q) for q in questions]
    batch, length = len(prompts), max(len(p) for p in prompts)
    guesses = [[]] * batch
    if drafts is not None and not config.do_sample:
        guesses = _draft_rows(drafts, batch, proc.ids["eos"], config.max_new_tokens, proc.ids["image"],
                              model.config.language.vocab_size)
    if length + max(map(len, guesses)) > (model.language_model.causal_lm.config.sliding_window or 1 << 30):
        guesses = [[]] * batch  # the rollback below assumes the whole sequence fits in the sliding window
    input_ids, attention, prompt_mask, position_ids = _prompt_batch(model, prompts, guesses, length)

    t0 = time.perf_counter()
    hidden, cache = model.language_model(
        model.input_embeds(input_ids, features.image_embeds), attention_mask=attention, position_ids=position_ids,
        use_cache=True, prefix_mask=prompt_mask,
    )
    rows = _Rows([[] for _ in range(batch)], [[] for _ in range(batch)], torch.zeros(batch, dtype=torch.bool, device=model.device),
                 attention, torch.full((batch,), length - 1, dtype=torch.long, device=model.device), [0] * batch)
    _accept_drafts(model, hidden, guesses, length, rows, config.max_new_tokens)
    t_prefill = time.perf_counter() - t0
    batch_index = torch.arange(batch, device=model.device)
    t0 = time.perf_counter()
    steps = _decode_steps(model, hidden[batch_index, rows.last_index], position_ids[batch_index, rows.last_index][:, None],
                          cache, rows, config)
    return Decoded(rows.tokens, rows.states, t_prefill, time.perf_counter() - t0, steps, rows.accepted, [len(g) for g in guesses])


def _prompt_batch(model, prompts, guesses, length):
    """Prompts left-padded to `length`, each row's draft tokens right after its prompt -> (input_ids, attention,
    prefix mask: the whole prompt, position ids)."""
    proc, dev = model.processor, model.device
    width = max(map(len, guesses))
    input_ids = torch.full((len(prompts), length + width), proc.ids["pad"], dtype=torch.long, device=dev)
    attention = torch.zeros((len(prompts), length + width), dtype=torch.long, device=dev)
    for b, (p, g) in enumerate(zip(prompts, guesses)):
        input_ids[b, length - len(p) : length + len(g)] = torch.tensor(p + g, device=dev)
        attention[b, length - len(p) : length + len(g)] = 1
    prompt_mask = attention.bool()
    prompt_mask[:, length:] = False  # draft tokens are causal like generated ones
    position_ids = (attention.cumsum(1) - 1).clamp_min(0)
    return input_ids, attention, prompt_mask, position_ids


def _accept_drafts(model, hidden, guesses, length, rows: _Rows, max_new_tokens):
    """Keep each row's draft tokens while they are the argmax of the state before them; mask out the rest."""
    eos = model.processor.ids["eos"]
    for b, guess in enumerate(guesses):
        if not guess:
            continue
        chosen = model.language_model.logits(hidden[b, length - 1 : length - 1 + len(guess)]).float().argmax(-1).tolist()
        while rows.accepted[b] < len(guess) and chosen[rows.accepted[b]] == guess[rows.accepted[b]]:
            rows.keep(b, guess[rows.accepted[b]], hidden[b, length - 1 + rows.accepted[b]], eos, max_new_tokens)
            rows.accepted[b] += 1
            if rows.done[b]:
                break
        rows.attention[b, length + rows.accepted[b] :] = 0  # rejected draft tokens stay in the cache, masked out
        rows.last_index[b] += rows.accepted[b]


def _decode_steps(model, last, position, cache, rows: _Rows, config: GenerationConfig):
    """One token per unfinished row and step until every row is done -> the number of steps."""
    pad, eos = model.processor.ids["pad"], model.processor.ids["eos"]
    generator = torch.Generator(device=model.device).manual_seed(config.seed) if config.seed is not None else None
    lm = model.language_model
    plan = lm.step_plan()
    static = None  # the compiled step's decoder, built at the first step (none when drafts were kept to the end)
    use_static = False
    if lm.compile_decode:
        reason = static_decode.unsupported_reason(lm, plan, rows.attention.shape[1] + config.max_new_tokens)
        use_static = reason is None
        if reason:
            static_decode.log_unsupported(lm, reason)
    logits = lm.logits(last).float() if not bool(rows.done.all()) else None  # drafts kept to the end: no head pass
    steps = 0
    while not bool(rows.done.all()):
        steps += 1
        if config.do_sample:
            probs = torch.softmax(logits / max(config.temperature, 1e-5), dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            next_ids = logits.argmax(-1)
        for b, (token, done) in enumerate(zip(next_ids.tolist(), rows.done.tolist())):  # one sync, not two per row
            if not done:
                rows.keep(b, token, last[b], eos, config.max_new_tokens)
        if bool(rows.done.all()):
            break
        next_ids = torch.where(rows.done, torch.full_like(next_ids, pad), next_ids)
        position = position + 1
        if use_static:  # the cache's mask is the decoder's own: rows.attention is not needed any more
            if static is None:
                static = static_decode.StaticDecoder(lm, plan, cache, rows.attention, config.max_new_tokens, last.dtype)
            hidden, logits = static.step(next_ids[:, None], position, ~rows.done)
            last = hidden[:, -1]
            continue
        rows.attention = torch.cat([rows.attention, (~rows.done).long()[:, None]], dim=1)
        embeds = lm.embed(next_ids[:, None])
        masks = lm.step_masks(rows.attention, embeds.dtype) if plan is not None else None
        if masks is not None:
            hidden = lm.fused_step(plan, embeds, masks["full_attention"], position, cache)
        else:
            hidden, cache = lm(embeds, attention_mask=rows.attention, position_ids=position, past_key_values=cache,
                               use_cache=True)
        last = hidden[:, -1]
        logits = lm.logits(last).float()
    return steps


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


def mask_probabilities(low_res: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask-decoder logits (N, h, w) -> foreground probabilities (N, H, W) at the image's original size."""
    return torch.sigmoid(F.interpolate(low_res[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0])


def mask_and_score(prob: torch.Tensor, threshold: float) -> tuple[np.ndarray, float]:
    """A probability map -> (bool mask above `threshold`, mean probability inside it; 0 for an empty mask)."""
    mask = prob > threshold
    return mask.cpu().numpy(), float(prob[mask].mean()) if bool(mask.any()) else 0.0


def decode_masks(model: RadDiagSegModel, features: ImageFeatures, ids: list, states: list, region=None) -> dict:
    """{image index: [(bool mask, score)] per generated seg token} at each image's original size; no decoder
    call without seg tokens."""
    seg = model.processor.seg_id_to_index
    picks = [(b, k) for b, row in enumerate(ids) for k, t in enumerate(row) if t in seg]
    if not picks:
        return {}
    model.mask_decoder_calls += 1
    hidden = torch.stack([states[b][k] for b, k in picks])
    image_index = torch.tensor([b for b, _ in picks], device=model.device)
    low_res = model.mask_decoder(features.vision, hidden, image_index, region=region).float()
    out = {}
    for j, (b, _) in enumerate(picks):
        prob = mask_probabilities(low_res[j][None], features.image_sizes[b])[0]
        out.setdefault(b, []).append(mask_and_score(prob, model.config.mask_threshold))
    return out


def answer_text(processor: RadDiagSegProcessor, ids: Sequence[int]) -> str:
    """Answer text of generated ids, seg tokens kept verbatim (bos/pad/image placeholders dropped)."""
    hidden_ids = {processor.ids["bos"], processor.ids["pad"], processor.ids["image"]}
    kept = [t for t in ids if t not in hidden_ids]
    return processor.tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def build_result(processor: RadDiagSegProcessor, ids: Sequence[int], masks: list, latencies: dict) -> GenerationResult:
    """The GenerationResult of one answer: its text, one SegmentResult per seg token (label read from the text)."""
    text = answer_text(processor, ids)
    labels = token_labels(text)
    if len(labels) != len(masks):
        log.warning("answer text has %d seg tokens but %d were generated", len(labels), len(masks))
    segments = [SegmentResult(label=label, token=token, mask=mask, score=score)
                for (label, token), (mask, score) in zip(labels, masks)]
    return GenerationResult(answer=text, segments=segments, latencies=dict(latencies), token_ids=list(ids))
