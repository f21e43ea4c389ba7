#!/usr/bin/env python
"""bf16 or fp32 on this CPU: the demo preset's model calls and paper-preset-sized layers, both dtypes in one run.

    .venv/bin/python benchmarks/dtype.py --threads 2

Demo preset (the shipped model, else an untrained one; 512x512 slice): encode_images, generate on
cached features (a fixed 3-step answer with 2 seg tokens is scripted so every variant decodes the
same tokens) and their per-stage times, in fp32, bf16 and "mixed" (image encoders bf16, LM and mask
decoder fp32); and how often each variant's greedy answers and masks agree with fp32 on phantoms. Paper-preset sizes (random weights; the whole 2.6 B model
in fp32 would not fit next to a bf16 copy on this machine): one Gemma-2 decoder layer (hidden
2304) on a 300-token prefill and on one decode step with that cache, and the SAM ViT-B MLP
(768 -> 3072 -> 768) on the 64x64 tokens of a 1024x1024 image. Each is timed alternately in both
dtypes; medians and the ratio bf16/fp32 are printed (< 1: bf16 is faster). The app's
`--conf dtype auto` serves the demo preset "mixed" and the paper preset in bf16 on a CPU with native
bf16, following these numbers (MONAILabelApp/lib/model_store.serving_precision).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path



def alternate(fns, repeats):
    """{name: median seconds}, calling the functions in turn (order rotated) so load drift hits all alike."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotated: no variant always runs first
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="demo model folder (default: the shipped demo model, else untrained)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--agreement", type=int, default=32, help="phantom slices on which answers/masks are compared with fp32 (0: skip)")
    args = p.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from latency import FORCED_ANSWER, SHIPPED_MODEL, build_random, machine, scripted_logits
    from raddiagseg import load_model, templates

    print(f"machine: {machine()}")
    folder = Path(args.model) if args.model else SHIPPED_MODEL
    if (folder / "config.json").is_file():
        base, name = load_model(str(folder)), str(folder)
    else:
        torch.manual_seed(0)
        base, name = build_random("demo", torch.float32), "untrained demo preset"
    models = {"fp32": base.eval()}
    models["bf16"] = load_model_copy(base, torch.bfloat16)
    models["mixed"] = load_model_copy(base, torch.float32).set_encoder_dtype(torch.bfloat16)  # encoders bf16, LM fp32
    image = np.random.default_rng(0).random((512, 512), dtype=np.float32)
    question = templates.DEFAULT_QUESTION
    answer = base.processor.answer_ids(templates.vqaseg_answer(*FORCED_ANSWER))
    if args.agreement:
        agreement(models, question, args.agreement)
    features = {k: m.encode_images([image]) for k, m in models.items()}
    resets = {k: scripted_logits(m, answer) for k, m in models.items()}
    last = {}

    def encode(k):
        return lambda: models[k].encode_images([image])

    def generate(k):
        def run():
            resets[k]()
            last[k] = models[k].generate(None, question, features=features[k], max_new_tokens=len(answer))
        return run

    print(f"\ndemo preset ({name}), 512x512 slice, {len(answer) - 1}-token answer + 2 masks; medians of {args.repeats} [ms]")
    t = alternate({**{f"encode {k}": encode(k) for k in models}, **{f"generate {k}": generate(k) for k in models}}, args.repeats)
    for what in ("encode", "generate"):
        print(f"  {what:9s} " + "   ".join(f"{k} {t[f'{what} {k}'] * 1000:7.1f}" for k in models)
              + "   " + ", ".join(f"{k}/fp32 {t[f'{what} {k}'] / t[f'{what} fp32']:.2f}" for k in models if k != "fp32"))
    for k in models:
        stages = {**features[k].latencies, **{s: v for s, v in last[k].latencies.items() if s not in features[k].latencies}}
        print(f"  stages {k} (encoders: the features' encode; LM, mask decoder: the last generate): " + ", ".join(f"{s} {v * 1000:.1f}" for s, v in stages.items()))
    cold = {k: t[f"encode {k}"] + t[f"generate {k}"] for k in models}
    print("  encode + generate: " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in cold.items()) + "; "
          + ", ".join(f"{k}/fp32 {cold[k] / cold['fp32']:.2f}" for k in models if k != "fp32"))

    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer, Gemma2RotaryEmbedding

    from raddiagseg.model.config import paper_config

    lm = paper_config().language
    gc = Gemma2Config(hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size, num_attention_heads=lm.num_attention_heads,
                      num_key_value_heads=lm.num_key_value_heads, head_dim=lm.head_dim, query_pre_attn_scalar=lm.query_pre_attn_scalar,
                      num_hidden_layers=1, vocab_size=1000)
    gc._attn_implementation = "eager"
    torch.manual_seed(0)
    layer32 = Gemma2DecoderLayer(gc, 0).eval()
    rotary = Gemma2RotaryEmbedding(gc)
    layers = {"fp32": layer32, "bf16": Gemma2DecoderLayer(gc, 0).eval().to(torch.bfloat16)}
    layers["bf16"].load_state_dict({k: v.to(torch.bfloat16) for k, v in layer32.state_dict().items()})
    n = 300
    x = torch.randn(1, n, lm.hidden_size)
    pos = torch.arange(n)[None]
    step = torch.randn(1, 1, lm.hidden_size)
    mlp = {"fp32": torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768))}
    mlp["bf16"] = copy_module(mlp["fp32"], torch.bfloat16)
    tokens = torch.randn(1, 64 * 64, 768)

    def prefill(k):
        dt = torch.float32 if k == "fp32" else torch.bfloat16
        emb = rotary(x, pos)
        return lambda: layers[k](x.to(dt), attention_mask=None, position_embeddings=tuple(e.to(dt) for e in emb), position_ids=pos)

    def decode(k):
        # one new token attending to a 300-token cache (projections, attention, MLP; rotary left out)
        dt = torch.float32 if k == "fp32" else torch.bfloat16
        layer = layers[k]
        attn = layer.self_attn
        keys = torch.randn(1, lm.num_key_value_heads, n, lm.head_dim, dtype=dt)

        def run():
            h = layer.input_layernorm(step.to(dt))
            q = attn.q_proj(h).view(1, 1, lm.num_attention_heads, lm.head_dim).transpose(1, 2)
            k_new = attn.k_proj(h).view(1, 1, lm.num_key_value_heads, lm.head_dim).transpose(1, 2)
            v_new = attn.v_proj(h).view(1, 1, lm.num_key_value_heads, lm.head_dim).transpose(1, 2)
            kk = torch.cat([keys, k_new], 2).repeat_interleave(lm.num_attention_heads // lm.num_key_value_heads, 1)
            vv = torch.cat([keys, v_new], 2).repeat_interleave(lm.num_attention_heads // lm.num_key_value_heads, 1)
            o = torch.softmax(q @ kk.transpose(-1, -2) / lm.head_dim**0.5, -1) @ vv
            h = attn.o_proj(o.transpose(1, 2).reshape(1, 1, -1))
            return layer.mlp(layer.pre_feedforward_layernorm(h))
        return run

    def vit_mlp(k):
        dt = torch.float32 if k == "fp32" else torch.bfloat16
        return lambda: mlp[k](tokens.to(dt))

    print(f"\npaper-preset sizes, random weights; medians of {args.repeats} [ms]")
    with torch.inference_mode():
        rows = {"Gemma-2 layer, 300-token prefill": prefill, "Gemma-2 layer, 1 decode step": decode, "SAM ViT-B MLP, 4096 tokens": vit_mlp}
        for label, make in rows.items():
            t = alternate({k: make(k) for k in ("fp32", "bf16")}, args.repeats)
            print(f"  {label:34s} fp32 {t['fp32'] * 1000:8.1f}   bf16 {t['bf16'] * 1000:8.1f}   bf16/fp32 {t['bf16'] / t['fp32']:.2f}")
    return 0


def agreement(models, question, n):
    """Answers and masks of each variant vs fp32 on n phantom slices (CT slices with and without tumours, X-rays)."""
    import numpy as np

    from raddiagseg.data import phantoms
    from raddiagseg.imaging import to_unit_range

    rng = np.random.default_rng(7)
    images = []
    while len(images) < n:
        ct = phantoms.generate_ct(rng, "liver" if len(images) % 2 else "pancreas", size=256, slices=8, tumours=1)
        images += [to_unit_range(ct.hu[k].astype(np.float32), "ct", None) for k in range(0, 8, 2)]
        xray = phantoms.generate_xray(rng, "COVID-19" if len(images) % 3 else "Normal", size=256)
        images.append(to_unit_range(xray.image.astype(np.float32), "xray", None))
    images = images[:n]
    outputs = {k: m.generate_batch(images, [question] * n, max_new_tokens=96) for k, m in models.items()}
    print(f"\nagreement with fp32 on {n} phantom slices (CT and X-ray, greedy answers)")
    for k in models:
        if k == "fp32":
            continue
        same = sum(a.answer == b.answer for a, b in zip(outputs["fp32"], outputs[k]))
        dices = []
        for a, b in zip(outputs["fp32"], outputs[k]):
            for sa, sb in zip(a.segments, b.segments):
                inter = np.logical_and(sa.mask, sb.mask).sum()
                total = sa.mask.sum() + sb.mask.sum()
                dices.append(1.0 if total == 0 else 2 * inter / total)
        positives = sum(bool(r.segments) for r in outputs["fp32"])
        print(f"  {k}: identical answers {same}/{n} ({positives} fp32 answers with masks); mask Dice vs fp32 "
              f"mean {np.mean(dices) if dices else float('nan'):.4f}, min {min(dices) if dices else float('nan'):.4f} over {len(dices)} masks")


def copy_module(module, dtype):
    import copy

    return copy.deepcopy(module).to(dtype)


def load_model_copy(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype).eval()


if __name__ == "__main__":
    sys.exit(main())
