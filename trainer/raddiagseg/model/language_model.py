"""Language model: transformers' Gemma-2 decoder (PaliGemma2's LM) with optional peft LoRA.

Image tokens enter as input embeddings; the LM's last-layer (post-norm) hidden states are
returned so that seg-token states can prompt the mask decoder.
"""

import warnings

import torch
from torch import nn


def gemma2_config(config, vocab_size, special_ids):
    from transformers import Gemma2Config

    lm = config
    gc = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=lm.hidden_size,
        intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_hidden_layers,
        num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_key_value_heads,
        head_dim=lm.head_dim,
        query_pre_attn_scalar=lm.query_pre_attn_scalar,
        sliding_window=lm.sliding_window,
        max_position_embeddings=lm.max_position_embeddings,
        final_logit_softcapping=lm.final_logit_softcapping,
        attn_logit_softcapping=lm.attn_logit_softcapping,
        rms_norm_eps=lm.rms_norm_eps,
        pad_token_id=special_ids["pad"],
        bos_token_id=special_ids["bos"],
        eos_token_id=special_ids["eos"],
        tie_word_embeddings=True,
    )
    gc._attn_implementation = lm.attn_implementation
    return gc


class LanguageModel(nn.Module):
    """Gemma2ForCausalLM, optionally wrapped by peft (LoRA on q/k/v/o/gate/up/down_proj + trainable seg-token rows)."""

    def __init__(self, config, vocab_size, special_ids, weights_dir=None):
        """`weights_dir`: a local PaliGemma2/Gemma-2 folder to load the base weights from (checked strictly)."""
        super().__init__()
        from transformers import Gemma2ForCausalLM

        self.config = config
        self.seg_ids = list(special_ids["seg"])
        gc = gemma2_config(config, vocab_size, special_ids)
        if weights_dir:
            from raddiagseg.model.weights import load_gemma2_folder

            self.lm = load_gemma2_folder(weights_dir, gc)
        else:
            self.lm = Gemma2ForCausalLM(gc)

    @property
    def causal_lm(self):
        """The Gemma2ForCausalLM inside (LoRA layers, if any, are injected in place)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def has_lora(self):
        return hasattr(self.lm, "get_base_model")

    def add_lora(self):
        """Wrap the LM with LoRA adapters and trainable seg-token embedding rows (call after loading base weights)."""
        from peft import LoraConfig, get_peft_model

        cfg = self.config
        targets = "|".join(cfg.lora_targets)
        peft_config = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=rf".*\.layers\.\d+\.(self_attn|mlp)\.({targets})$",
            trainable_token_indices={"embed_tokens": self.seg_ids},
            bias="none",
        )
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.lm = get_peft_model(self.lm, peft_config)

    def train(self, mode=True):
        """Also write the trainable seg-token rows into the embedding matrix in eval mode (peft's merge), and take
        them out again for training. Unmerged, peft's TrainableTokens layer copies the whole embedding matrix
        (257k x 2304 for the paper preset, shared with the tied LM head) on every call, twice per decoded token:
        measured on 2 CPU cores, the paper preset decoded at 1.20 s per token unmerged and 0.36 s merged. Merged,
        those rows hold the same values, so outputs do not change."""
        super().train(mode)
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        layers = [m for m in self.modules() if isinstance(m, TrainableTokensLayer) and m.merged == mode]
        # eval() may be called inside generate's inference mode: the merged matrix must stay a normal tensor
        with torch.inference_mode(False), torch.no_grad():
            for layer in layers:
                layer.unmerge() if mode else layer.merge()
        return self

    def embed(self, input_ids):
        return self.causal_lm.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False, prefix_mask=None):
        """-> (last hidden states (B, L, D) after the final norm, cache).

        `prefix_mask` (B, L) bool marks image + question tokens; with `config.prefix_attention` they
        attend to each other bidirectionally (PaliGemma's prefix-LM) when the whole sequence is given.
        """
        mask = attention_mask
        if self.config.prefix_attention and prefix_mask is not None:
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                raise ValueError("prefix attention is built for a full sequence, not on top of a cache")
            mask = self.prefix_lm_masks(attention_mask, prefix_mask, inputs_embeds.dtype)
        elif past_key_values is not None and inputs_embeds.shape[1] == 1 and attention_mask is not None:
            mask = self.step_masks(attention_mask, inputs_embeds.dtype) or attention_mask
        out = self.causal_lm.model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values

    # decode steps through `fused_step` instead of transformers' module tree (benchmarks/decode_overhead.py)
    fused_decode = True
    # decode steps compiled on a preallocated cache (`static_decode`; opt-in: compiling costs seconds per process)
    compile_decode = False

    def step_plan(self):
        """What `fused_step` reads, gathered once per answer, or None where it would not compute exactly what
        transformers does (training, gradients, an attention other than eager, forward hooks)."""
        lm = self.causal_lm
        model = lm.model
        if (not self.fused_decode or self.training or torch.is_grad_enabled()
                or lm.config._attn_implementation != "eager"
                or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())):
            return None
        config = model.config
        from transformers.models.gemma2 import modeling_gemma2

        def norm(n):
            return (1.0 + n.weight.float(), n.eps)

        layers = []
        for layer in model.layers[: config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(tuple(_projection(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                                          mlp.gate_proj, mlp.up_proj, mlp.down_proj))
                          + (mlp.act_fn,) + tuple(norm(n) for n in (layer.input_layernorm, layer.post_attention_layernorm,
                                                                    layer.pre_feedforward_layernorm,
                                                                    layer.post_feedforward_layernorm)))
        return {"layers": layers, "norm": norm(model.norm), "rotary": model.rotary_emb,
                "head_dim": config.head_dim, "groups": config.num_attention_heads // config.num_key_value_heads,
                "scaling": config.query_pre_attn_scalar ** -0.5, "softcap": config.attn_logit_softcapping,
                "rotate_half": modeling_gemma2.rotate_half, "repeat_kv": modeling_gemma2.repeat_kv}

    @staticmethod
    def fused_step(plan, inputs_embeds, mask, position_ids, cache):
        """One cached decode step (B, 1, D) -> last hidden states (B, 1, D) after the final norm. The tensor operations
        of transformers' eager Gemma-2 path, in its order and dtypes (so the same values, bit for bit), without its
        module calls, keyword plumbing and per-call config and attribute lookups: on the demo preset those cost more
        than the step's matmuls (benchmarks/RESULTS.md, "Demo preset: decode step overhead").
        `plan`: `step_plan()`; `mask`: the step's additive (B, 1, 1, L) mask (`step_masks`); `cache`: transformers'
        cache, updated in place."""
        rotate_half, repeat_kv = plan["rotate_half"], plan["repeat_kv"]
        hidden = inputs_embeds
        batch, head_dim, groups = hidden.shape[0], plan["head_dim"], plan["groups"]
        scaling, softcap = plan["scaling"], plan["softcap"]
        cos, sin = plan["rotary"](hidden, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for index, (q_proj, k_proj, v_proj, o_proj, gate, up, down, act, n1, n2, n3, n4) in enumerate(plan["layers"]):
            x = gemma_norm(hidden, n1)
            q = _project(q_proj, x).view(batch, 1, -1, head_dim).transpose(1, 2)
            k = _project(k_proj, x).view(batch, 1, -1, head_dim).transpose(1, 2)
            v = _project(v_proj, x).view(batch, 1, -1, head_dim).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k, v = cache.update(k, v, index)
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
            weights = torch.matmul(q, k.transpose(2, 3)) * scaling
            if softcap is not None:
                weights = torch.tanh(weights / softcap) * softcap
            weights = weights + mask[:, :, :, : k.shape[-2]]
            weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(weights, v).transpose(1, 2).contiguous().reshape(batch, 1, -1).contiguous()
            hidden = hidden + gemma_norm(_project(o_proj, out), n2)
            x = gemma_norm(hidden, n3)
            hidden = hidden + gemma_norm(_project(down, act(_project(gate, x)) * _project(up, x)), n4)
        return gemma_norm(hidden, plan["norm"])

    def step_masks(self, attention_mask, dtype):
        """The additive (B, 1, 1, L) masks of one decode step (one new token per row, after L - 1 cached ones), or
        None once L outgrows the sliding window (transformers then builds them, with its cropped sliding cache).

        While L fits in the window the full and sliding layers' masks are the same: every cached key whose
        `attention_mask` is 1, the value transformers' eager masks give (0, or the dtype's minimum), so outputs
        are bit for bit the same. Why: transformers builds both masks from the 2D mask at every step, about a
        third of a small LM's decode step on CPU (the demo preset's 4 x 256 Gemma-2)."""
        window = self.causal_lm.config.sliding_window
        if window is not None and attention_mask.shape[1] > window:
            return None
        mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        mask = mask.masked_fill_(attention_mask == 0, torch.finfo(dtype).min)[:, None, None]
        return {"full_attention": mask, "sliding_attention": mask}

    def prefix_lm_masks(self, attention_mask, prefix_mask, dtype):
        """Additive (B, 1, L, L) masks for Gemma-2's full and sliding layers: causal, plus prefix<->prefix, minus padding."""
        batch, length = prefix_mask.shape
        device = prefix_mask.device
        valid = torch.ones_like(prefix_mask) if attention_mask is None else attention_mask.bool()
        q = torch.arange(length, device=device)[:, None]
        k = torch.arange(length, device=device)[None, :]
        causal = (k <= q)[None]
        both_prefix = prefix_mask[:, :, None] & prefix_mask[:, None, :]
        allowed = (causal | both_prefix) & valid[:, None, :]
        window = self.causal_lm.config.sliding_window or length
        sliding = allowed & ((q - k) < window)[None]
        low = torch.finfo(dtype).min

        def additive(a):
            return torch.zeros(a.shape, dtype=dtype, device=device).masked_fill(~a, low)[:, None]

        return {"full_attention": additive(allowed), "sliding_attention": additive(sliding)}

    def logits(self, hidden):
        """LM head + Gemma-2's final logit softcapping, on any subset of hidden states."""
        lm = self.causal_lm
        logits = lm.lm_head(hidden)
        cap = lm.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _projection(module):
    """A plain nn.Linear as (weight, bias), for `_project` to apply as its forward does; anything else (peft LoRA,
    int8) as the module, called."""
    return (module.weight, module.bias) if type(module) is nn.Linear else module


def _project(projection, x):
    if isinstance(projection, tuple):
        return torch.nn.functional.linear(x, *projection)
    return projection(x)


def gemma_norm(x, norm):
    """transformers' Gemma2RMSNorm.forward, operation for operation; `norm`: (1 + its weight as float32, eps)."""
    scale, eps = norm
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y * scale).type_as(x)

