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

import re
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from raddiagseg.model.outputs import ImageFeatures


def answer_key(text):
    """What a vote compares: for a 3-step answer its conclusion (detection, diagnosis, the targets it names, in
    order), so chain-of-thought paths that reason differently but conclude alike agree; other answers count as
    the same when their conclusions differ only in case or whitespace."""
    from raddiagseg.answers import parse_answer, split_reasoning
    from raddiagseg.templates import normalise_label

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


@torch.inference_mode()
def generate_tts(model, image, question, num_answers=4, num_masks=4, temperature=0.7, prompt_noise=0.05,
                 max_new_tokens=128, features=None, seed=0, rvls2m=None):
    """`model.generate` with test-time scaling -> GenerationResult with `agreement` = {"answer", "masks"}."""
    if num_answers < 1 or num_masks < 1:
        raise ValueError("num_answers and num_masks must be at least 1")
    model.processor.prompt_ids(question)  # validate before any work
    latencies = dict.fromkeys(("preprocess", "vision", "clip", "prefill", "decode", "mask_decoder"), 0.0)
    if features is None:
        if image is None:
            raise ValueError("give an image or precomputed features")
        features = model.encode_images([image])
        latencies.update(features.latencies)
    if len(features) != 1:
        raise ValueError(f"generate_tts takes one image, got features of {len(features)}")
    features = features.to(model.device, model.dtype)
    region = model.region_config(rvls2m)
    was_training = model.training
    model.eval()
    try:
        ids, states, t_prefill, t_decode = model._decode(features, [question], max_new_tokens, False, 1.0, None)[:4]
        if num_answers > 1:
            repeated = ImageFeatures.cat([features] * (num_answers - 1))
            s_ids, s_states, t2, t3 = model._decode(repeated, [question] * (num_answers - 1), max_new_tokens, True, temperature, seed)[:4]
            ids, states = ids + s_ids, states + s_states
            t_prefill, t_decode = t_prefill + t2, t_decode + t3
        latencies["prefill"], latencies["decode"] = t_prefill, t_decode
        texts = [model._decode_text(row) for row in ids]
        first, group, answer_share = majority_answer(texts, prefer=0)

        t0 = time.perf_counter()
        seg_ids = model.processor.seg_id_to_index
        positions = {p: [k for k, t in enumerate(ids[p]) if t in seg_ids] for p in group}
        n_tokens = len(positions[first])
        group = [p for p in group if len(positions[p]) == n_tokens]  # same conclusion, same number of masks
        chosen, mask_agreement = [], []
        if n_tokens:
            generator = torch.Generator().manual_seed(seed)
            prompts = []
            for token in range(n_tokens):
                for p in group:
                    state = states[p][positions[p][token]]
                    for j in range(num_masks):
                        if region is not None:  # the region mask is perturbed below, the prompt kept
                            prompts.append(state)
                            continue
                        noise = torch.randn(state.shape, generator=generator).to(state) if j else torch.zeros_like(state)
                        prompts.append(state + prompt_noise * state.float().std().to(state.dtype) * noise)
            prompts = torch.stack(prompts)
            image_index = torch.zeros(len(prompts), dtype=torch.long, device=model.device)
            regions = None
            if region is not None:
                from raddiagseg.model.rvls2m import perturb_regions

                sparse = model.mask_decoder.text_to_prompt(prompts.to(model.mask_decoder.text_to_prompt.weight.dtype))
                regions = model.mask_decoder.region_masks(features.vision, sparse, image_index, region)
                perturbed = perturb_regions(regions.cpu(), generator).to(regions)
                keep = torch.tensor([j == 0 for _ in range(len(prompts) // num_masks) for j in range(num_masks)], device=regions.device)
                regions = torch.where(keep[:, None, None], regions, perturbed)
            model.mask_decoder_calls += 1
            low_res = model.mask_decoder(features.vision, prompts, image_index, region=region, regions=regions)
            h, w = features.image_sizes[0]
            probs = torch.sigmoid(F.interpolate(low_res[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0])
            per_token = len(group) * num_masks
            for token in range(n_tokens):
                candidates = probs[token * per_token : (token + 1) * per_token]
                binary = (candidates > model.config.mask_threshold).cpu().numpy()
                best, agreement = consensus_index(binary)
                mask = binary[best]
                score = float(candidates[best][torch.from_numpy(mask)].mean()) if mask.any() else 0.0
                chosen.append((mask, score))
                mask_agreement.append(agreement)
            latencies["mask_decoder"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    result = model._result(0, ids[first], chosen, latencies)
    result.agreement = {"answer": answer_share, "masks": mask_agreement, "paths": len(ids), "masks_per_path": num_masks,
                        "uncertainty": uncertainty(answer_share, mask_agreement)}
    return result
