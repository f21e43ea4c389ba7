"""Compiled decode steps on a preallocated KV cache (opt-in: `LanguageModel.compile_decode`, `raddiagseg predict
--compile-decode`, the app's `--conf compile_decode true`).

Why: a small LM's decode step is mostly not arithmetic. On the demo preset (4 x 256 Gemma-2) `fused_step` still
dispatches some 300 small tensor operations per token and grows transformers' cache by concatenation; with
torch.compile (inductor) on fixed shapes those fuse into a few C++ loops around the 30 matmuls, and the per-token
path outside the matmuls falls from 1.2-1.7 ms to 0.1-0.9 ms (benchmarks/RESULTS.md, "Demo preset: decode step
overhead"). The price is compiling (below). Hence opt-in: it pays for `predict` over many rows and for a server that
answers all day, not for one answer.

Shapes are fixed per answer: the cache holds `prompt + max_new_tokens` rounded up to SLOT_BUCKET slots per layer, slots
not written yet are masked out, and the batch is padded to a power of two, so one graph serves every step and every
answer of a similar length and batch (each new pair compiles once: 4-16 s measured, a few seconds from inductor's
on-disk cache in a later process; past torch.compile's limit of graphs per function, new shapes run uncompiled and
the compiled ones stay). Not used (the fused step runs instead) for LoRA or int8 projections, attention other than
eager, or a cache longer than the sliding window; `raddiagseg predict` and the app log why, once per reason. The step
computes what `LanguageModel.fused_step` + `LanguageModel.logits` compute, in the same dtypes; the compiler may sum in
another order, so values can differ in the last bits (answers and masks compared in tests/test_paper_scale.py). Where the compiler is missing or fails, the same step runs uncompiled (logged once).
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F

from raddiagseg.model.language_model import gemma_norm

log = logging.getLogger(__name__)

SLOT_BUCKET = 64  # cache lengths are rounded up to a multiple of this: fewer distinct shapes, fewer compilations


def unsupported_reason(lm, plan, cache_length):
    """None when a static step can replace `fused_step` for this answer, else why not: it needs the fused step's plan
    (eval mode without gradients, eager attention, no hooks), plain Linear projections (not LoRA or int8 modules), a
    plain LM head, and a cache that fits in the sliding window (where every layer attends to all of it)."""
    if plan is None:
        return ("the model is training or computing gradients" if lm.training or torch.is_grad_enabled() else
                "its attention is not eager, fused decoding is off or a module has hooks")
    if any(not isinstance(p, tuple) for layer in plan["layers"] for p in layer[:7]):
        return "its LM has LoRA adapters (merge them first)" if lm.has_lora else "its projections are int8 or not plain Linear"
    head = lm.causal_lm.lm_head
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return "its LM head is int8 or not a plain Linear"
    window = lm.causal_lm.config.sliding_window
    if window is not None and cache_length > window:
        return f"an answer's cache is longer than the sliding window ({window} positions)"
    return None


def log_unsupported(lm, reason):
    """Say once per model and reason that `compile_decode` is on but this model decodes with the fused step."""
    said = lm.__dict__.setdefault("_static_unsupported_logged", set())
    if reason not in said:
        said.add(reason)
        log.warning("compile_decode: this decode step cannot be compiled (%s); decoding with the fused step", reason)


def step_function(lm, plan):
    """The pure step (ids (B, 1), position (B, 1), active (B,) bool, slot (1,), then the decoder's buffers: mask (B, 1,
    1, S), keys and values (layers, B, kv heads, S, hd), cos and sin tables (positions, hd)) -> (last hidden states
    (B, 1, D) after the final norm, logits (B, V) as float32). It opens `slot` in the mask for the `active` rows and
    writes the step's keys and values there."""
    layers, final = plan["layers"], plan["norm"]
    head_dim, groups, scaling, softcap = plan["head_dim"], plan["groups"], plan["scaling"], plan["softcap"]
    embed = lm.causal_lm.get_input_embeddings()
    head = lm.causal_lm.lm_head.weight
    cap = lm.causal_lm.config.final_logit_softcapping
    half = head_dim // 2

    def rotate(t, cos, sin):
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

    def step(ids, position, active, slot, mask, keys, values, cos_table, sin_table):
        hidden = embed(ids)
        batch = hidden.shape[0]
        mask.index_copy_(3, slot, torch.where(active, 0.0, torch.finfo(mask.dtype).min).to(mask.dtype).view(batch, 1, 1, 1))
        cos, sin = cos_table[position].unsqueeze(1), sin_table[position].unsqueeze(1)
        for index, (q_proj, k_proj, v_proj, o_proj, gate, up, down, act, n1, n2, n3, n4) in enumerate(layers):
            x = gemma_norm(hidden, n1)
            q = F.linear(x, *q_proj).view(batch, 1, -1, head_dim).transpose(1, 2)
            k = F.linear(x, *k_proj).view(batch, 1, -1, head_dim).transpose(1, 2)
            v = F.linear(x, *v_proj).view(batch, 1, -1, head_dim).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            keys[index].index_copy_(2, slot, k)
            values[index].index_copy_(2, slot, v)
            all_k, all_v = keys[index], values[index]
            if groups > 1:
                all_k, all_v = all_k.repeat_interleave(groups, 1), all_v.repeat_interleave(groups, 1)
            weights = torch.matmul(q, all_k.transpose(2, 3)) * scaling
            if softcap is not None:
                weights = torch.tanh(weights / softcap) * softcap
            weights = torch.softmax(weights + mask, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(weights, all_v).transpose(1, 2).reshape(batch, 1, -1)
            hidden = hidden + gemma_norm(F.linear(out, *o_proj), n2)
            x = gemma_norm(hidden, n3)
            hidden = hidden + gemma_norm(F.linear(act(F.linear(x, *gate)) * F.linear(x, *up), *down), n4)
        hidden = gemma_norm(hidden, final)
        logits = F.linear(hidden[:, -1], head)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return hidden, logits.float()

    return step


# One compiled call (and one step build) at a time in this process: dynamo and inductor are not thread-safe while they
# compile, and two models, or one model before and after a weight change, share them.
_COMPILE_LOCK = threading.RLock()


def _weights_key(lm):
    """The identity, version (bumped by in-place updates), storage, dtype and device of every LM weight: a model whose
    weights were loaded, trained, cast or moved since its step was built gets a new one, not a step that reads stale
    copies."""
    return tuple((id(p), p._version, p.data_ptr(), p.dtype, str(p.device)) for p in lm.causal_lm.parameters())


def compiled_step(lm, plan):
    """The model's step, built once per state of its weights and kept on it: {"eager", "compiled", "failed", "eager_shapes"}."""
    key = _weights_key(lm)
    with _COMPILE_LOCK:
        cached = getattr(lm, "_static_step", None)
        if cached is None or cached["key"] != key:
            eager = step_function(lm, plan)
            cached = {"key": key, "eager": eager, "failed": False, "eager_shapes": set(),
                      "compiled": torch.compile(eager, dynamic=False, fullgraph=True)}
            lm._static_step = cached
    return cached


def _bucket(n):
    """Batch sizes are padded up to a power of two: one compiled graph per bucket, not per batch size."""
    return 1 << max(0, int(n) - 1).bit_length()


class StaticDecoder:
    """One answer's decode state on fixed-size cache buffers, filled from the prefill pass's transformers cache.
    Rows beyond the batch (up to its power-of-two bucket) attend to one empty slot and are dropped from the outputs."""

    def __init__(self, lm, plan, cache, attention, max_new_tokens, dtype):
        batch, length = attention.shape
        size = -(-(length + max_new_tokens) // SLOT_BUCKET) * SLOT_BUCKET
        rows = _bucket(batch)
        first = cache.layers[0].keys
        shape = (len(cache.layers), rows, first.shape[1], size, first.shape[-1])
        self.keys, self.values = first.new_zeros(shape), first.new_zeros(shape)
        for index, layer in enumerate(cache.layers):
            self.keys[index, :batch, :, :length] = layer.keys
            self.values[index, :batch, :, :length] = layer.values
        low = torch.finfo(dtype).min
        self.mask = torch.full((rows, 1, 1, size), low, dtype=dtype, device=attention.device)
        self.mask[:batch, 0, 0, :length] = torch.where(attention.bool(), 0.0, low)
        self.mask[batch:, 0, 0, 0] = 0.0  # padding rows: one (zero) key, so their softmax stays finite
        self.batch, self.length = batch, length
        positions = torch.arange(size, device=attention.device)[None]  # a row's position < its length <= size
        cos, sin = plan["rotary"](torch.empty(1, dtype=dtype, device=attention.device), positions)  # in `dtype`
        self.cos, self.sin = cos[0], sin[0]
        self.functions = compiled_step(lm, plan)

    def step(self, ids, position, active):
        """(hidden (B, 1, D), logits (B, V)) for the tokens `ids` (B, 1) at `position` (B, 1); `active` (B,): rows
        whose token is real (finished rows feed padding, masked out as transformers' attention mask does)."""
        slot = torch.tensor([self.length], device=ids.device)
        self.length += 1
        extra = self.mask.shape[0] - self.batch
        if extra:
            ids = torch.cat([ids, ids[:1].expand(extra, -1)])
            position = torch.cat([position, position[:1].expand(extra, -1)])
            active = torch.cat([active, active.new_zeros(extra)])
        args = (ids, position, active, slot, self.mask, self.keys, self.values, self.cos, self.sin)
        hidden, logits = self._run(args)
        return hidden[: self.batch], logits[: self.batch]

    def _run(self, args):
        functions = self.functions
        shape = tuple(self.mask.shape)  # (bucket, 1, 1, cache size): what a compiled graph is specialised on
        if functions["failed"] or shape in functions["eager_shapes"]:
            return functions["eager"](*args)
        # One compiled call at a time (see _COMPILE_LOCK); guards are checked on every call (~0.05 ms).
        with _COMPILE_LOCK:
            try:
                return functions["compiled"](*args)
            except torch._dynamo.exc.FailOnRecompileLimitHit:  # more shapes than torch.compile keeps: this one uncompiled,
                # from now on without asking torch.compile again (each refused call costs milliseconds and a warning)
                if not functions["eager_shapes"]:
                    log.warning("compiled decode step: torch.compile's graph limit reached; new shapes decode uncompiled")
                functions["eager_shapes"].add(shape)
            except Exception as error:  # no C++ compiler, an unsupported operation: the same step, uncompiled
                functions["failed"] = True
                log.warning("compiled decode step unavailable (%s: %s); decoding uncompiled",
                            type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return functions["eager"](*args)
