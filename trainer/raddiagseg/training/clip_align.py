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


def _pool(tokens):
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
        return tuple(scale * F.normalize(head(_pool(x)), dim=-1) @ text.t()
                     for head, x in ((self.patch_head, patches), (self.token_head, tokens)))


def _stack(dataset, indices, size):
    """Images of different sizes, each resized to the CLIP input size (as `ClipEncoder.preprocess` would)."""
    out = []
    for i in indices:
        image = torch.as_tensor(dataset[i]["image"], dtype=torch.float32)[None, None]
        out.append(F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0])
    return torch.stack(out)


class _ResizedImages(torch.utils.data.Dataset):
    """(image resized to the CLIP input size, caption index) per dataset row, for a DataLoader."""

    def __init__(self, dataset, labels, size):
        self.dataset, self.labels, self.size = dataset, labels, size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return _stack(self.dataset, [i], self.size)[0], self.labels[i]


def _batches(dataset, labels, batch_size, steps, seed, size, num_workers=0):
    """`steps` batches in a seeded order (whole permutations of the data, repeated); images load in
    `num_workers` processes so that decoding and augmenting overlap the training step."""
    rng = np.random.default_rng(seed)
    order = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(len(dataset)).tolist())
    loader = torch.utils.data.DataLoader(_ResizedImages(dataset, labels, size), batch_size=batch_size,
                                         sampler=order[: steps * batch_size], num_workers=num_workers)
    yield from loader


def _accuracy(aligner, dataset, labels, batch_size=64):
    """(overall accuracy, {caption: accuracy}) of picking each image's caption among all captions."""
    size = aligner.clip_encoder.config.image_size
    device = aligner.text_table.device
    if len(dataset) == 0:
        return None, {}
    aligner.eval()
    picked = []
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            idx = range(start, min(len(dataset), start + batch_size))
            picked += aligner(_stack(dataset, idx, size).to(device))[1].argmax(1).tolist()  # the projector's tokens
    aligner.train()
    hits = np.array(picked) == np.array(labels)
    per_caption = {aligner.captions[c]: float(hits[np.array(labels) == c].mean()) for c in sorted(set(labels))}
    return float(hits.mean()), per_caption


def align_clip_encoder(model, manifest, steps=400, batch_size=32, lr=1e-3, seed=0, progress=True, device="cpu",
                       num_workers=0):
    """Train `model.clip_encoder` and `model.projector` in place on the manifest's VQA-Seg images; returns a summary dict
    with the caption accuracy on the train and val splits (val: images the alignment never saw).

    The two modules run on `device` and are moved back to where they were afterwards."""
    from raddiagseg.data.dataset import ManifestDataset

    torch.manual_seed(seed)
    train_set = ManifestDataset(manifest, split="train", tasks=["vqaseg"], augment=True, seed=seed)
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
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="CLIP alignment", unit="step")
    losses = []
    for images, labels in _batches(train_set, train_labels, batch_size, steps, seed, model.clip_encoder.config.image_size,
                                   num_workers):
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
    train_acc, _ = _accuracy(aligner, ManifestDataset(manifest, split="train", tasks=["vqaseg"]), train_labels)
    val_acc, val_per_caption = _accuracy(aligner, val_set, val_labels)
    summary = {"steps": steps, "captions": captions, "final_loss": float(np.mean(losses[-20:])),
               "train_acc": train_acc, "val_acc": val_acc, "val_acc_per_caption": val_per_caption}
    model.clip_encoder.to(home)
    model.projector.to(home)
    model.train(was_training)
    for p in frozen:
        p.requires_grad_(False)
    log.info("CLIP alignment: %s", summary)
    return summary
