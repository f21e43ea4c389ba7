"""Stage 0 of the demo model: CLIP-style image–caption alignment of the CLIP encoder and projector.

The `paper` preset starts from BiomedCLIP, whose vision tower was contrastively pretrained on
image–caption pairs, so its patch tokens already say what is in the image. The `demo` preset's
CLIP encoder starts from random weights, and a language loss alone teaches it too slowly which
slices hold a lesion. This stage gives it the same kind of start on phantom data: each VQA-Seg image
is paired with a caption written from its ground truth ("ct liver: Liver tumour", "xray chest:
no abnormality", ...), and the CLIP loss is applied with the text side reduced to one learnable
embedding per distinct caption (duplicate captions in a batch would otherwise be false negatives).
The loss is applied to the pooled CLIP patches and to the projector's output tokens (as BLIP-2
pre-trains its Q-Former's learnable queries with an image-text contrastive loss), so the few image
tokens the LM reads carry the finding too. Measured on the demo build: aligned at the patches only
(val caption accuracy 0.85), the finetuned LM still answered "yes" to every X-ray; aligned at the
projector only, the accuracy reached 0.62 in the same 800 steps.
Only the encoder and projector weights are kept; the caption table and pooling head are discarded.
"""

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ORGAN_OF_SOURCE = {"msd_liver": "liver", "msd_pancreas": "pancreas", "covidqu": "chest"}


def caption(row):
    """The alignment caption of a manifest row: modality, region and finding."""
    region = ORGAN_OF_SOURCE.get(row.get("source"), row.get("source") or "body")
    finding = row.get("diagnosis") if row.get("detection") else "no abnormality"
    return f"{row['modality']} {region}: {finding}"


def pool_tokens(tokens):
    """Mean and max over tokens: the max keeps a small lesion from being averaged away."""
    return torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1)


class CaptionAligner(nn.Module):
    """Two image embeddings, one pooled from the CLIP patches and one from the projector's image
    tokens, each scored against one embedding per caption. `forward` returns both logit tables;
    the projector's is what the LM will be able to read."""

    def __init__(self, clip_encoder, projector, captions, dim=128):
        super().__init__()
        self.clip_encoder = clip_encoder
        self.projector = projector
        self.captions = list(captions)
        patch_width, token_width = clip_encoder.config.embed_dim, projector.queries.shape[-1]
        self.patch_head = nn.Sequential(nn.LayerNorm(2 * patch_width), nn.Linear(2 * patch_width, dim))
        self.token_head = nn.Sequential(nn.LayerNorm(2 * token_width), nn.Linear(2 * token_width, dim))
        self.text_table = nn.Parameter(torch.randn(len(self.captions), dim) * 0.02)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def forward(self, images):
        patches = self.clip_encoder(self.clip_encoder.preprocess(images))
        tokens = self.projector(patches)
        text = F.normalize(self.text_table, dim=-1)
        scale = self.logit_scale.exp().clamp(max=100)
        return tuple(scale * F.normalize(head(pool_tokens(x)), dim=-1) @ text.t()
                     for head, x in ((self.patch_head, patches), (self.token_head, tokens)))


def resize_images(dataset, indices, size):
    """Images of different sizes, each resized to the CLIP input size (as `ClipEncoder.preprocess` would)."""
    out = []
    for i in indices:
        image = torch.as_tensor(dataset[i]["image"], dtype=torch.float32)[None, None]
        out.append(F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0])
    return torch.stack(out)


class _ResizedImages(torch.utils.data.Dataset):
    """Each dataset row's image resized to the CLIP input size, for a DataLoader."""

    def __init__(self, dataset, size):
        self.dataset, self.size = dataset, size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return resize_images(self.dataset, [i], self.size)[0]


def load_all_resized(dataset, size, num_workers=0, progress=False):
    """Every image of `dataset` (read without augmentation) resized to `size`, as one float16 (N, size, size) tensor.

    Why: the alignment visits each image ~20 times; reading and warping it at full size every time (MONAI, one image
    per call) took 0.26 s of a 0.42 s step for a batch of 32 on 2 cores. Read once here, augmented per batch below."""
    loader = torch.utils.data.DataLoader(_ResizedImages(dataset, size), batch_size=64, num_workers=num_workers)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="CLIP alignment images", unit="batch")
    batches = [images.to(torch.float16) for images in loader]
    return torch.cat(batches) if batches else torch.zeros(0, size, size, dtype=torch.float16)


# The ranges of `ManifestDataset`'s augmentations (data/dataset.py `_augmenter`), per kind: warp chance, rotation
# (radians), zoom, shift (fraction of the image), intensity scale (multiplicative for "basic", around the mean for
# "scanner") and shift, gamma chance and range, noise chance and largest σ, blur chance and σ range (px at 224),
# sharpen chance, mirror chance, X-ray inversion chance. Optional, per modality: CT contrast chance and factor around
# the soft-tissue level (`CT_SOFT_TISSUE`, air kept black), X-ray gamma chance and range (replacing `gamma` on X-rays),
# thick-slice chance (a CT slice averaged with its volume's neighbouring slices, see `neighbour_means`).
AUGMENT_RANGES = {
    "basic": dict(warp=0.7, angle=0.12, zoom=0.1, shift=0.11, scale=(0.9, 1.1), around_mean=False, offset=0.05,
                  gamma_p=0.3, gamma=(0.8, 1.25), noise_p=0.4, noise=0.02, blur_p=0.0, blur=(0.3, 1.5),
                  sharpen_p=0.0, mirror_p=0.0, invert_p=0.0, padding="border"),
    "scanner": dict(warp=0.8, angle=0.44, zoom=0.2, shift=0.125, scale=(0.55, 1.5), around_mean=True, offset=0.08,
                    gamma_p=0.4, gamma=(0.45, 2.4), noise_p=0.5, noise=0.08, blur_p=0.3, blur=(0.3, 1.5),
                    sharpen_p=0.2, mirror_p=0.1, invert_p=0.15, padding="zeros"),
    # "acquisition": the scanner differences of the robustness benchmark, drawn the way each modality's physics makes
    # them, so that a tumour stays as visible as it was: a CT contrast change scales soft tissue around its level
    # (contrast to noise kept; "scanner"'s scaling around the image mean moves air and fat instead), thick slices and
    # soft kernels smooth and lower the noise (blur), X-ray exposure is a gamma; patient position and mirrored anatomy
    # for both (no caption names a side).
    "acquisition": dict(warp=0.8, angle=0.44, zoom=0.15, shift=0.11, scale=(0.9, 1.1), around_mean=False, offset=0.05,
                        gamma_p=0.3, gamma=(0.8, 1.25), noise_p=0.4, noise=0.04, blur_p=0.35, blur=(0.3, 1.5),
                        sharpen_p=0.1, mirror_p=0.5, invert_p=0.0, padding="zeros",
                        ct_contrast_p=0.6, ct_contrast=(0.5, 1.3), xray_gamma_p=0.5, xray_gamma=(0.45, 2.4),
                        thick_p=0.35),
}
CT_SOFT_TISSUE = 0.5  # 40 HU in the model's CT window (imaging.CT_WINDOW: level 40, width 400)


def _gaussian_blur(x, sigma):
    """(B, H, W) images each blurred with its own σ (B,), separable, one grouped convolution per axis."""
    radius = int(math.ceil(3 * float(sigma.max()))) if len(sigma) else 0
    if radius == 0:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma[:, None].clamp_min(1e-3)) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)
    n = x.shape[0]
    y = F.conv2d(F.pad(x[None], (radius, radius, 0, 0), mode="reflect"), kernels.view(n, 1, 1, -1), groups=n)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernels.view(n, 1, -1, 1), groups=n)
    return y[0]


def augment_batch(images, generator, kind="basic", xray=None, ct=None):
    """Stage 0's augmentation (`AUGMENT_RANGES[kind]`; "basic" and "scanner" are also `ManifestDataset`'s), drawn per
    image but applied to the whole (B, H, W) batch in a few tensor calls instead of one MONAI call per image.
    `xray`, `ct`: (B,) bool, which images are X-rays (polarity, exposure) and which CT (contrast around soft tissue);
    no caption names a side, so any may mirror."""
    r = AUGMENT_RANGES[kind]
    n = images.shape[0]

    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=generator)

    def chosen(p):
        return torch.rand(n, generator=generator) < p

    x = images.float()
    if r.get("ct_contrast_p") and ct is not None:  # first, on the image as windowed: air (0) stays air; warping and
        # blurring after it blend values the way a scanner's kernel does before windowing
        f = torch.where(chosen(r["ct_contrast_p"]) & ct.bool(), uniform(*r["ct_contrast"]), torch.ones(n)).view(n, 1, 1)
        x = torch.where(x > 0, CT_SOFT_TISSUE + f * (x - CT_SOFT_TISSUE), x).clamp(0.0, 1.0)
    warp = chosen(r["warp"])
    angle = torch.where(warp, uniform(-r["angle"], r["angle"]), torch.zeros(n))
    scale = torch.where(warp, uniform(1 - r["zoom"], 1 + r["zoom"]), torch.ones(n))
    shift = torch.where(warp[:, None], torch.stack([uniform(-r["shift"], r["shift"]),
                                                    uniform(-r["shift"], r["shift"])], 1), torch.zeros(n, 2))
    mirror = torch.where(chosen(r["mirror_p"]), -torch.ones(n), torch.ones(n))
    theta = torch.stack([torch.stack([mirror * scale * angle.cos(), -scale * angle.sin(), shift[:, 0]], 1),
                         torch.stack([mirror * scale * angle.sin(), scale * angle.cos(), shift[:, 1]], 1)], 1)
    x = x[:, None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode=r["padding"], align_corners=False)[:, 0]
    per_image = (n, 1, 1)
    if r["blur_p"]:
        blurred = _gaussian_blur(x, torch.where(chosen(r["blur_p"]), uniform(*r["blur"]), torch.zeros(n)))
        sharpen = torch.where(chosen(r["sharpen_p"]), uniform(0.5, 1.5), torch.zeros(n)).view(per_image)
        smooth = torch.where(sharpen > 0, x, blurred)  # a sharpened image is not also blurred
        x = smooth + sharpen * (x - _gaussian_blur(x, torch.full((n,), 1.0)))
    is_xray = torch.zeros(n, dtype=torch.bool) if xray is None else xray.bool()
    factor = torch.where(chosen(0.5), uniform(*r["scale"]), torch.ones(n)).view(per_image)
    if r["around_mean"]:
        mean = x.mean((1, 2), keepdim=True)
        x = (x - mean) * factor + mean
    else:
        x = x * factor
    x = x + torch.where(chosen(0.5), uniform(-r["offset"], r["offset"]), torch.zeros(n)).view(per_image)
    gamma = torch.where(chosen(r["gamma_p"]), uniform(*r["gamma"]), torch.ones(n))
    if r.get("xray_gamma_p"):
        gamma = torch.where(is_xray, torch.where(chosen(r["xray_gamma_p"]), uniform(*r["xray_gamma"]), torch.ones(n)), gamma)
    gamma = gamma.view(per_image)
    low, high = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
    span = (high - low).clamp_min(1e-7)
    x = ((x - low) / span).clamp_min(0) ** gamma * span + low
    noise_std = torch.where(chosen(r["noise_p"]), uniform(0.0, r["noise"]), torch.zeros(n)).view(per_image)
    x = (x + noise_std * torch.randn(x.shape, generator=generator)).clamp(0.0, 1.0)
    if r["invert_p"] and xray is not None:
        invert = (chosen(r["invert_p"]) & xray.bool()).view(per_image)
        x = torch.where(invert, 1.0 - x, x)
    return x


def neighbour_means(rows, images):
    """(N, H, W): for each CT row, the mean of the slices next to it in its volume (those the set has; the slice
    itself when it has none), for X-rays the image itself. A thick slice is the slice averaged with these
    (partial volume: what a 3-5 mm reconstruction of thin slices shows)."""
    where = {(r.get("volume"), r.get("slice")): i for i, r in enumerate(rows) if r["modality"] == "ct"}
    means = images.clone()
    for i, r in enumerate(rows):
        if r["modality"] != "ct" or r.get("volume") is None:
            continue
        near = [where[key] for key in ((r["volume"], r["slice"] - 1), (r["volume"], r["slice"] + 1)) if key in where]
        if near:
            means[i] = images[near].float().mean(0).to(images.dtype)
    return means


def _batches(images, labels, batch_size, steps, seed, kind="basic", xray=None, neighbours=None, ct=None):
    """`steps` augmented batches of the resized `images` in a seeded order (whole permutations, repeated).
    `neighbours` (`neighbour_means`): with the kind's `thick_p`, a CT image becomes (slice + w · both neighbours) /
    (1 + 2w), w uniform in [0, 1] (w = 1: three slices averaged)."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    thick_p = AUGMENT_RANGES[kind].get("thick_p", 0.0) if neighbours is not None else 0.0
    order = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(len(images)).tolist())
    labels = torch.as_tensor(labels)
    for step in range(steps):
        index = torch.as_tensor(order[step * batch_size: (step + 1) * batch_size])
        batch = images[index].float()
        if thick_p:
            n = len(index)
            w = torch.where(torch.rand(n, generator=generator) < thick_p, torch.rand(n, generator=generator),
                            torch.zeros(n)).view(n, 1, 1)
            batch = (batch + 2 * w * neighbours[index].float()) / (1 + 2 * w)
        yield (augment_batch(batch, generator, kind, None if xray is None else xray[index],
                             None if ct is None else ct[index]), labels[index])


def _accuracy(aligner, images, labels, batch_size=64):
    """(overall accuracy, {caption: accuracy}) of picking each image's caption among all captions;
    `images` as `load_all_resized` returns them."""
    device = aligner.text_table.device
    if len(images) == 0:
        return None, {}
    aligner.eval()
    picked = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start: start + batch_size].float().to(device)
            picked += aligner(batch)[1].argmax(1).tolist()  # the projector's tokens
    aligner.train()
    hits = np.array(picked) == np.array(labels)
    per_caption = {aligner.captions[c]: float(hits[np.array(labels) == c].mean()) for c in sorted(set(labels))}
    return float(hits.mean()), per_caption


def align_clip_encoder(model, manifest, steps=400, batch_size=32, lr=1e-3, seed=0, progress=True, device="cpu",
                       num_workers=0, augmentation="basic", also_val=None):
    """Train `model.clip_encoder` and `model.projector` in place on the manifest's VQA-Seg images; returns a summary dict
    with the caption accuracy on the train and val splits (val: images the alignment never saw), and on the val
    split of each `also_val` {name: manifest} (e.g. phantoms of another generator version) as `val_acc_<name>`;
    a value (manifest, None) scores all of that manifest's splits (a held-out set).

    The images are read once (in `num_workers` processes), kept in memory at the CLIP input size (float16, ~100 kB
    each at 224 px: 0.3 GB for the demo's 3226) and augmented per batch with `augment_batch`.

    The two modules run on `device` and are moved back to where they were afterwards."""
    from raddiagseg.data.dataset import ManifestDataset

    torch.manual_seed(seed)
    train_set = ManifestDataset(manifest, split="train", tasks=["vqaseg"], augment=False)
    val_set = ManifestDataset(manifest, split="val", tasks=["vqaseg"], augment=False)
    if len(train_set) == 0:
        raise ValueError(f"{manifest} has no VQA-Seg training images to align the CLIP encoder on")
    captions = sorted({caption(r) for r in train_set.rows})
    index = {c: i for i, c in enumerate(captions)}
    train_labels = [index[caption(r)] for r in train_set.rows]
    keep = [i for i, r in enumerate(val_set.rows) if caption(r) in index]
    val_set.rows = [val_set.rows[i] for i in keep]
    val_labels = [index[caption(r)] for r in val_set.rows]

    home = next(model.clip_encoder.parameters()).device
    aligner = CaptionAligner(model.clip_encoder, model.projector, captions).to(device)
    was_training = model.training
    frozen = [p for m in (model.clip_encoder, model.projector) for p in m.parameters() if not p.requires_grad]
    model.clip_encoder.requires_grad_(True)
    model.projector.requires_grad_(True)
    aligner.train()
    optimizer = torch.optim.AdamW([p for p in aligner.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    size = model.clip_encoder.config.image_size
    train_images = load_all_resized(train_set, size, num_workers, progress)
    val_images = load_all_resized(val_set, size, num_workers, progress)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="CLIP alignment", unit="step")
    losses = []
    xray = torch.tensor([r["modality"] == "xray" for r in train_set.rows])
    ct = torch.tensor([r["modality"] == "ct" for r in train_set.rows])
    neighbours = neighbour_means(train_set.rows, train_images) if AUGMENT_RANGES[augmentation].get("thick_p") else None
    for images, labels in _batches(train_images, train_labels, batch_size, steps, seed, augmentation, xray, neighbours,
                                   ct):
        images, labels = images.to(device), labels.to(device)
        loss = sum(F.cross_entropy(logits, labels) for logits in aligner(images))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    train_acc, _ = _accuracy(aligner, train_images, train_labels)
    val_acc, val_per_caption = _accuracy(aligner, val_images, val_labels)
    summary = {"steps": steps, "augmentation": augmentation, "captions": captions, "final_loss": float(np.mean(losses[-20:])),
               "train_acc": train_acc, "val_acc": val_acc, "val_acc_per_caption": val_per_caption}
    for name, other in (also_val or {}).items():
        other, split = other if isinstance(other, tuple) else (other, "val")
        other_set = ManifestDataset(other, split=split, tasks=["vqaseg"], augment=False)
        other_set.rows = [r for r in other_set.rows if caption(r) in index]
        summary[f"val_acc_{name}"], summary[f"val_acc_per_caption_{name}"] = _accuracy(
            aligner, load_all_resized(other_set, size, num_workers), [index[caption(r)] for r in other_set.rows])
    model.clip_encoder.to(home)
    model.projector.to(home)
    model.train(was_training)
    for p in frozen:
        p.requires_grad_(False)
    log.info("CLIP alignment: %s", summary)
    return summary
