"""Medical CLIP image encoder: BiomedCLIP's ViT-B/16 vision trunk (timm), giving patch tokens for the LM."""

import torch
import torch.nn.functional as F
from torch import nn


class ClipEncoder(nn.Module):
    """(B, H, W) images in [0, 1] -> (B, N_patches, D) patch tokens (class token dropped).

    Same timm `VisionTransformer` that open_clip builds for BiomedCLIP (`vit_base_patch16_224`,
    no pooling, no classifier), so `visual.trunk.*` weights load into `self.trunk` unchanged.
    """

    def __init__(self, config):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.config = config
        self.trunk = VisionTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            num_classes=0,
            global_pool="",
        )
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images):
        """(B, H, W) in [0, 1] -> (B, 3, S, S) normalised with the CLIP mean/std."""
        if images.dim() == 3:
            images = images[:, None]
        size = self.config.image_size
        x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(0, 1).expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def forward(self, pixels):
        return self.trunk.forward_features(pixels)[:, self.trunk.num_prefix_tokens :]
