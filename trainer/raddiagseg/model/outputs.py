"""Result types of the model: cached image features and generation results (INTERFACES "Model")."""

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ImageFeatures:
    """Encoder outputs for a batch of images, reusable across questions (the app caches them per slice).

    vision: (B, 256, h, w) SAM embeddings for the mask decoder; image_embeds: (B, N, D_lm) projected
    CLIP tokens for the LM; image_sizes: original (H, W) of each image.
    """

    vision: torch.Tensor
    image_embeds: torch.Tensor
    image_sizes: list
    latencies: dict = field(default_factory=dict)

    def __len__(self):
        return self.vision.shape[0]

    def __getitem__(self, index):
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"image index {index} out of range for {len(self)} images")
            index = slice(index % len(self), index % len(self) + 1)
        sizes = self.image_sizes[index] if isinstance(index, slice) else [self.image_sizes[i] for i in index]
        return ImageFeatures(self.vision[index], self.image_embeds[index], list(sizes), dict(self.latencies))

    @classmethod
    def cat(cls, items):
        """Join several ImageFeatures (e.g. cached single images) into one batch."""
        items = list(items)
        if len(items) == 1:
            return items[0]
        return cls(
            torch.cat([f.vision for f in items]),
            torch.cat([f.image_embeds for f in items]),
            [s for f in items for s in f.image_sizes],
            {},
        )

    def to(self, device=None, dtype=None):
        return ImageFeatures(self.vision.to(device=device, dtype=dtype), self.image_embeds.to(device=device, dtype=dtype), self.image_sizes, self.latencies)


@dataclass
class SegmentResult:
    label: str  # text written before the seg token on its line, bullets stripped ("liver")
    token: str  # "<seg000>"
    mask: np.ndarray  # bool (H, W) at the input image's size
    score: float  # mean foreground probability inside the mask (0 when the mask is empty)


@dataclass
class GenerationResult:
    answer: str
    segments: list
    latencies: dict
    token_ids: list = field(default_factory=list)
    agreement: dict = field(default_factory=dict)  # test-time scaling only: share of paths agreeing, mask consensus IoU
    draft: dict = field(default_factory=dict)  # with a draft: {"offered": tokens guessed, "accepted": tokens kept}
