"""RVLS2M, region-aware vision-language similarity to mask (paper 003 §3.1, Algorithm 1).

For each seg token, its projected embedding E_seg (the sparse SAM prompt, φ = `text_to_prompt`)
is compared with every image token of the vision encoder (the SAM image embedding F, one
token per cell of its h x w grid): Sim = E_img · E_seg, softmax over the n = h·w tokens, the
2D map average-pooled into g x g non-overlapping cells of b = floor(min(h, w) / g) tokens a
side, and the cells chosen by the τ strategy (the k most similar cells, or every cell above the
mean) form a binary region mask M_region. It reaches the SAM decoder as the dense (mask)
prompt, next to the sparse embedding, instead of SAM's "no mask" embedding.

Our LM's image tokens are Perceiver-resampled queries without a spatial layout, so the image
tokens here are the vision encoder's (as in the paper's test-time scaling section, "image
tokens derived from the vision encoder").
"""

import torch
import torch.nn.functional as F

STRATEGIES = ("topk", "mean")


def similarity_map(image_embeddings, prompts):
    """(K, C, h, w) image tokens, (K, C) seg embeddings -> (K, h, w) softmax-normalised similarity (sums to 1)."""
    sim = torch.einsum("kchw,kc->khw", image_embeddings.float(), prompts.float())
    k, h, w = sim.shape
    return torch.softmax(sim.reshape(k, h * w), dim=-1).reshape(k, h, w)


def grid_pool(maps, grid):
    """(K, h, w) -> (K, g, g): mean over non-overlapping b x b cells, b = floor(min(h, w) / g) (tokens past g·b dropped)."""
    h, w = maps.shape[-2:]
    b = min(h, w) // grid
    if b < 1:
        raise ValueError(f"RVLS2M grid {grid} is finer than the {h}x{w} image-token map")
    return F.avg_pool2d(maps[:, None, : grid * b, : grid * b], kernel_size=b)[:, 0]


def select_cells(regions, strategy="topk", top_k=8):
    """τ strategy on (K, g, g) region similarities -> (K, g, g) float {0, 1}.

    topk: the `top_k` most similar cells (ties broken by position); mean: every cell above the mean.
    """
    k, g, _ = regions.shape
    flat = regions.reshape(k, g * g)
    if strategy == "topk":
        if not 1 <= top_k <= g * g:
            raise ValueError(f"RVLS2M top_k must be between 1 and {g * g} for a {g}x{g} grid, got {top_k}")
        chosen = torch.zeros_like(flat)
        chosen.scatter_(1, flat.topk(top_k, dim=1).indices, 1.0)
    elif strategy == "mean":
        chosen = (flat > flat.mean(dim=1, keepdim=True)).to(flat.dtype)
    else:
        raise ValueError(f"RVLS2M strategy must be one of {STRATEGIES}, got {strategy!r}")
    return chosen.reshape(k, g, g)


def region_masks(image_embeddings, prompts, grid, strategy="topk", top_k=8):
    """Algorithm 1 for K seg tokens: (K, C, h, w), (K, C) -> (K, g, g) binary region masks (no gradient)."""
    with torch.no_grad():
        return select_cells(grid_pool(similarity_map(image_embeddings, prompts), grid), strategy, top_k)


def perturb_regions(regions, generator):
    """A random perturbation g(M_region, θ) per mask (paper 003 eq. 12): shift by one cell, dilate or erode."""
    out = []
    for region in regions:
        choice = int(torch.randint(0, 4, (1,), generator=generator))
        r = region[None, None]
        if choice == 0:  # dilate: every cell next to the region joins it
            r = F.max_pool2d(r, 3, stride=1, padding=1)
        elif choice == 1:  # erode, keeping at least one cell
            eroded = -F.max_pool2d(-r, 3, stride=1, padding=1)
            r = eroded if bool(eroded.any()) else r
        else:  # shift by one cell in a random direction (zeros come in at the border)
            dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
            shifted = torch.roll(r, shifts=(dy, dx), dims=(2, 3))
            if dy:
                shifted[..., 0 if dy > 0 else -1, :] = 0
            if dx:
                shifted[..., :, 0 if dx > 0 else -1] = 0
            r = shifted if bool(shifted.any()) else r
        out.append(r[0, 0])
    return torch.stack(out) if out else regions


def mask_prompt(regions, embedding_size, mask_size):
    """(K, g, g) binary cells -> (K, 1, mask_size, mask_size) SAM mask input: +1 inside the region, -1 outside.

    Each cell covers b image tokens a side (as pooled), i.e. b·mask_size/embedding_size mask pixels.
    """
    k, g, _ = regions.shape
    b = embedding_size // g
    covered = b * g * mask_size // embedding_size
    up = F.interpolate(regions[:, None].float(), size=(covered, covered), mode="nearest")
    up = F.pad(up, (0, mask_size - covered, 0, mask_size - covered))
    return up * 2.0 - 1.0
