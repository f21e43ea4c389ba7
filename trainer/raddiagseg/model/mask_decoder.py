"""Mask decoder: SAM `PromptEncoder` + `MaskDecoder`, prompted by LM hidden states of seg tokens."""

import torch
from torch import nn


class SegMaskDecoder(nn.Module):
    """LM hidden states of seg tokens + one image embedding -> one low-res mask logit map per token.

    A linear layer maps each hidden state to a sparse prompt embedding; the dense prompt is SAM's
    "no mask" embedding, or with RVLS2M (`region=` an `RVLS2MConfig`) the embedded region mask of
    that token's vision-language similarity (`raddiagseg.model.rvls2m`). SAM's `MaskDecoder` decodes the prompts of one image per call (it repeats that image's embedding), so
    `forward` loops over images and batches the prompts that belong to each image.
    """

    def __init__(self, lm_hidden_size, vision_config, config):
        super().__init__()
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

        dim = vision_config.out_chans
        grid = vision_config.embedding_size
        self.text_to_prompt = nn.Linear(lm_hidden_size, dim)
        self.prompt_encoder = PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(vision_config.image_size, vision_config.image_size),
            mask_in_chans=config.mask_in_chans,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(
                depth=config.transformer_depth, embedding_dim=dim, mlp_dim=config.transformer_mlp_dim, num_heads=config.transformer_heads
            ),
            num_multimask_outputs=config.num_multimask_outputs,
            iou_head_depth=3,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        )

    def dense_pe(self):
        """SAM's dense positional encoding; computed in fp32 even when the model is bf16/fp16 (SAM's grid is fp32)."""
        pe_layer = self.prompt_encoder.pe_layer
        gaussian = pe_layer.positional_encoding_gaussian_matrix
        if gaussian.dtype == torch.float32:
            return self.prompt_encoder.get_dense_pe()
        pe_layer.positional_encoding_gaussian_matrix = gaussian.float()
        try:
            return self.prompt_encoder.get_dense_pe()
        finally:
            pe_layer.positional_encoding_gaussian_matrix = gaussian

    def region_masks(self, image_embeddings, prompts, image_index, region):
        """(K, g, g) binary RVLS2M region masks of K sparse prompts (their own image's tokens)."""
        from raddiagseg.model import rvls2m

        return rvls2m.region_masks(image_embeddings[image_index], prompts, region.grid, region.strategy, region.top_k)

    def region_prompt(self, regions, dtype):
        """(K, g, g) region masks -> (K, C, h, w) dense prompt embeddings (SAM's mask branch)."""
        from raddiagseg.model import rvls2m

        h, w = self.prompt_encoder.image_embedding_size
        size = self.prompt_encoder.mask_input_size[0]
        masks = rvls2m.mask_prompt(regions, h, size).to(self.prompt_encoder.mask_downscaling[0].weight.dtype)
        _, dense = self.prompt_encoder(points=None, boxes=None, masks=masks)  # SAM's mask branch, no points or boxes
        return dense.to(dtype)

    def forward(self, image_embeddings, hidden_states, image_index, region=None, regions=None):
        """image_embeddings (B, C, h, w); hidden_states (K, D_lm); image_index (K,) long -> (K, 4h, 4w) logits.

        region: an `RVLS2MConfig` to prompt with region masks (None: SAM's "no mask"); regions: (K, g, g)
        region masks to use instead of computing them (test-time scaling passes perturbed ones).
        """
        prompts = self.text_to_prompt(hidden_states.to(self.text_to_prompt.weight.dtype))
        dense_all = None
        if regions is None and region is not None:
            regions = self.region_masks(image_embeddings, prompts, image_index, region)
        if regions is not None:
            dense_all = self.region_prompt(regions, prompts.dtype)
        out = prompts.new_empty((prompts.shape[0], 4 * image_embeddings.shape[-2], 4 * image_embeddings.shape[-1]))
        image_pe = self.dense_pe().to(prompts.dtype)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        for b in torch.unique(image_index).tolist():
            select = (image_index == b).nonzero(as_tuple=True)[0]
            sparse = prompts[select].unsqueeze(1)
            if dense_all is None:
                dense = no_mask.expand(len(select), -1, *image_embeddings.shape[-2:]).to(prompts.dtype)
            else:
                dense = dense_all[select]
            low_res, _ = self.mask_decoder(
                image_embeddings=image_embeddings[b : b + 1].to(prompts.dtype),
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            out = out.index_put((select,), low_res[:, 0])
        return out
