"""Test-time scaling (paper 003, §3.3), choosing by agreement instead of ground truth.

m answers are decoded for one image (the greedy one + m-1 sampled ones); the answer most paths
agree on wins. For each of its seg tokens, every agreeing path's prompt is perturbed n times
(n=1 keeps it as is) and decoded into a candidate mask: with RVLS2M, as in the paper, its region
mask is perturbed (shifted, dilated or eroded by one grid cell, `rvls2m.perturb_regions`);
without it, Gaussian noise is added to the hidden state;
the candidate with the highest mean IoU to all the others (the consensus) is returned. The
agreement levels come back in `result.agreement`, a confidence signal for the user and for
active learning.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from raddiagseg.model import generation
from raddiagseg.model.generation import GenerationConfig
from raddiagseg.model.outputs import GenerationResult, ImageFeatures

if TYPE_CHECKING:
    from raddiagseg.model.raddiagseg import RadDiagSegModel

SAMPLING = GenerationConfig(do_sample=True, temperature=0.7, seed=0)  # the sampled paths' default settings


def answer_key(text):
    """What a vote compares: for a 3-step answer its conclusion (detection, diagnosis, the targets it names, in
    order), so chain-of-thought paths that reason differently but conclude alike agree; other answers count as
    the same when their conclusions differ only in case or whitespace."""
    from raddiagseg.answers import parse_answer, split_reasoning
    from raddiagseg.vocabulary import normalise_label

    parsed = parse_answer(text)
    if parsed.detection is not None:
        diagnosis = normalise_label(parsed.diagnosis or "") if parsed.detection else ""
        labels = "|".join(normalise_label(label) for label, _ in parsed.segments)
        return f"detection={parsed.detection};diagnosis={diagnosis};targets={labels}"
    return re.sub(r"\s+", " ", split_reasoning(text)[1].strip().lower())


def majority_answer(texts, prefer=0):
    """Index of the answer most texts agree on (ties: the group holding `prefer`, else the earliest); and its share."""
    keys = [answer_key(t) for t in texts]
    counts = Counter(keys)
    best = max(counts.values())
    tied = [k for k in counts if counts[k] == best]
    winner = keys[prefer] if keys[prefer] in tied else next(k for k in keys if k in tied)
    return keys.index(winner), [i for i, k in enumerate(keys) if k == winner], best / len(texts)


def consensus_index(masks):
    """Index of the boolean mask with the highest mean IoU to the others, and that mean IoU (1.0 for one mask)."""
    flat = torch.as_tensor(np.stack([np.asarray(m, bool).reshape(-1) for m in masks])).float()
    if len(flat) == 1:
        return 0, 1.0
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
    mean = (iou.sum(1) - iou.diagonal()) / (len(flat) - 1)
    best = int(mean.argmax())
    return best, float(mean[best])


def uncertainty(answer_share, mask_agreement):
    """Disagreement of the paths in [0, 1]: 1 - the mean of the answer share and every mask's consensus IoU."""
    parts = [answer_share, *mask_agreement]
    return float(1.0 - sum(parts) / len(parts))


@dataclass(frozen=True)
class TTSConfig:
    """m answer paths (`num_answers`: the greedy one + m-1 sampled), n perturbed prompts per path and seg token
    (`num_masks`: 1 keeps the prompt as is), and the hidden-state noise without RVLS2M (`prompt_noise` x its std)."""

    num_answers: int = 4
    num_masks: int = 4
    prompt_noise: float = 0.05

    def __post_init__(self):
        if self.num_answers < 1 or self.num_masks < 1:
            raise ValueError("num_answers and num_masks must be at least 1")


@torch.inference_mode()
def generate_tts(model: RadDiagSegModel, image: np.ndarray | None, question: str, tts: TTSConfig = TTSConfig(),
                 sampling: GenerationConfig = SAMPLING, features: ImageFeatures | None = None) -> GenerationResult:
    """`model.generate` with test-time scaling -> GenerationResult with `agreement` = {"answer", "masks", ...}.

    `sampling` decodes the m-1 sampled paths (its max_new_tokens and rvls2m also hold for the greedy path; its
    seed also seeds the prompt perturbations)."""
    model.processor.prompt_ids(question)  # validate before any work
    latencies = dict.fromkeys(generation.LATENCY_KEYS, 0.0)
    features = model.image_features(None if image is None else [image], features, latencies)
    if len(features) != 1:
        raise ValueError(f"generate_tts takes one image, got features of {len(features)}")
    region = model.region_config(sampling.rvls2m)
    was_training = model.training
    model.eval()
    try:
        ids, states = _answer_paths(model, features, question, tts.num_answers, sampling, latencies)
        first, group, answer_share = majority_answer([generation.answer_text(model.processor, row) for row in ids], prefer=0)
        t0 = time.perf_counter()
        seg_ids = model.processor.seg_id_to_index
        positions = {p: [k for k, t in enumerate(ids[p]) if t in seg_ids] for p in group}
        n_tokens = len(positions[first])
        group = [p for p in group if len(positions[p]) == n_tokens]  # same conclusion, same number of masks
        chosen, mask_agreement = [], []
        if n_tokens:
            prompt_states = [[states[p][positions[p][token]] for p in group] for token in range(n_tokens)]
            chosen, mask_agreement = _consensus_masks(model, features, prompt_states, tts, region, sampling.seed)
            latencies["mask_decoder"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    result = generation.build_result(model.processor, ids[first], chosen, latencies)
    result.agreement = {"answer": answer_share, "masks": mask_agreement, "paths": len(ids), "masks_per_path": tts.num_masks,
                        "uncertainty": uncertainty(answer_share, mask_agreement)}
    return result


def _answer_paths(model, features, question, num_answers, sampling, latencies):
    """The greedy answer and num_answers - 1 sampled ones -> (token ids, hidden states) per path."""
    greedy = dataclasses.replace(sampling, do_sample=False, temperature=1.0, seed=None)
    decoded = generation.decode(model, features, [question], greedy)
    ids, states, latencies["prefill"], latencies["decode"] = decoded.tokens, decoded.states, decoded.prefill, decoded.decode
    if num_answers > 1:
        repeated = ImageFeatures.cat([features] * (num_answers - 1))
        sampled = generation.decode(model, repeated, [question] * (num_answers - 1), sampling)
        ids, states = ids + sampled.tokens, states + sampled.states
        latencies["prefill"] += sampled.prefill
        latencies["decode"] += sampled.decode
    return ids, states


def _perturbed_prompts(prompt_states, num_masks, prompt_noise, region, generator):
    """n prompts per (seg token, path) state, token-major: the state itself first, then noisy copies (with RVLS2M
    the region masks are perturbed instead and every prompt is the state)."""
    prompts = []
    for per_path in prompt_states:
        for state in per_path:
            for j in range(num_masks):
                if region is not None:
                    prompts.append(state)
                    continue
                noise = torch.randn(state.shape, generator=generator).to(state) if j else torch.zeros_like(state)
                prompts.append(state + prompt_noise * state.float().std().to(state.dtype) * noise)
    return torch.stack(prompts)


def _consensus_masks(model, features, prompt_states, tts, region, seed):
    """Per seg token the consensus of its candidate masks -> ([(mask, score)], [consensus IoU])."""
    generator = torch.Generator().manual_seed(seed)
    prompts = _perturbed_prompts(prompt_states, tts.num_masks, tts.prompt_noise, region, generator)
    image_index = torch.zeros(len(prompts), dtype=torch.long, device=model.device)
    regions = None
    if region is not None:
        from raddiagseg.model.rvls2m import perturb_regions

        sparse = model.mask_decoder.text_to_prompt(prompts.to(model.mask_decoder.text_to_prompt.weight.dtype))
        regions = model.mask_decoder.region_masks(features.vision, sparse, image_index, region)
        perturbed = perturb_regions(regions.cpu(), generator).to(regions)
        keep = torch.tensor([j == 0 for _ in range(len(prompts) // tts.num_masks) for j in range(tts.num_masks)], device=regions.device)
        regions = torch.where(keep[:, None, None], regions, perturbed)
    model.mask_decoder_calls += 1
    low_res = model.mask_decoder(features.vision, prompts, image_index, region=region, regions=regions)
    probs = generation.mask_probabilities(low_res, features.image_sizes[0])
    per_token = len(prompt_states[0]) * tts.num_masks
    chosen, agreement = [], []
    for token in range(len(prompt_states)):
        candidates = probs[token * per_token : (token + 1) * per_token]
        binary = (candidates > model.config.mask_threshold).cpu().numpy()
        best, consensus = consensus_index(binary)
        chosen.append(generation.mask_and_score(candidates[best], model.config.mask_threshold))
        agreement.append(consensus)
    return chosen, agreement
