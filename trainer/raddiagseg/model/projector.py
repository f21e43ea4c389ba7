"""Multimodal projector (paper 001 appendix): MLP on the embedding dim, then Perceiver-style token reduction."""

import torch
from torch import nn


class Projector(nn.Module):
    """(B, N, D_clip) patch tokens -> (B, num_queries, D_lm) image tokens for the LM.

    Step 1 aligns the embedding dimension with a 2-layer MLP; step 2 condenses the tokens with
    a fixed set of learnable queries that cross-attend to them (Perceiver IO), plus a
    feed-forward block, both residual and pre-normalised.
    """

    def __init__(self, clip_dim, lm_dim, num_queries, num_heads):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(clip_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        self.queries = nn.Parameter(torch.randn(num_queries, lm_dim) * 0.02)
        self.norm_q = nn.LayerNorm(lm_dim)
        self.norm_kv = nn.LayerNorm(lm_dim)
        self.cross_attn = nn.MultiheadAttention(lm_dim, num_heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(lm_dim)
        self.ff = nn.Sequential(nn.Linear(lm_dim, 4 * lm_dim), nn.GELU(), nn.Linear(4 * lm_dim, lm_dim))
        self.norm_out = nn.LayerNorm(lm_dim)

    def forward(self, tokens):
        kv = self.norm_kv(self.mlp(tokens))
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x = q + self.cross_attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        x = x + self.ff(self.norm_ff(x))
        return self.norm_out(x)
