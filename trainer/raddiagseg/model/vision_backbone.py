"""Vision backbone: SAM's `ImageEncoderViT` with MedSAM's input normalisation (pixel features for masks)."""

from functools import partial

import torch.nn.functional as F
from torch import nn


class VisionBackbone(nn.Module):
    """(B, H, W) images in [0, 1] -> (B, out_chans, S/16, S/16) embeddings (S = encoder input size).

    MedSAM feeds the encoder the slice resized to S×S, min-max scaled to [0, 1] and repeated to
    3 channels, without SAM's ImageNet mean/std; `preprocess` does exactly that.
    """

    def __init__(self, config):
        super().__init__()
        from segment_anything.modeling import ImageEncoderViT

        self.config = config
        self.image_encoder = ImageEncoderViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=3,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            out_chans=config.out_chans,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_abs_pos=True,
            use_rel_pos=config.use_rel_pos,
            window_size=config.window_size,
            global_attn_indexes=tuple(config.global_attn_indexes),
        )

    def preprocess(self, images):
        """(B, H, W) or (B, 1, H, W) float -> (B, 3, S, S), each image min-max scaled to [0, 1]."""
        if images.dim() == 3:
            images = images[:, None]
        size = self.config.image_size
        x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        high = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - low) / (high - low).clamp_min(1e-8)
        return x.expand(-1, 3, -1, -1)

    def forward(self, pixels):
        """`pixels` from `preprocess` -> image embeddings."""
        return self.image_encoder(pixels)
