#!/usr/bin/env python
"""What one decode step of a small LM costs against its matmuls, through transformers' modules and through
`LanguageModel.fused_step`.

    nice -n 10 .venv/bin/python benchmarks/decode_overhead.py [--model DIR] [--rounds 4] [--results]

Greedy answers to the app's default question on CT phantom slices (cached image features, so only the LM
runs), three paths interleaved round by round in this one process:

- transformers: its Gemma-2 modules, building the full and sliding attention masks from the 2D mask at every step;
- step masks: its modules, with `LanguageModel.step_masks` handing them the (B, 1, 1, L) masks;
- fused step: `LanguageModel.fused_step`, the same operations without the module tree (the default);
- compiled step: `static_decode` (opt-in `LanguageModel.compile_decode`): the step on a preallocated cache, compiled
  by torch.compile (its first answer, which compiles, is the untimed warm-up; its compile time is reported).

Per token it reports the thread's CPU time (robust on a shared box: waiting for a core is not counted) and the
wall time; the fused step's projection matmuls timed where they run (their weights come from memory each step),
and the rest of the per-token path as the difference; and the projections and LM head timed alone in a loop
that keeps their weights in cache. The compiled step runs the same matmuls (aten::mm on the same weights, one token),
so its per-token path outside them is its time minus the fused step's in-place matmul time. Answers (token ids) of
all paths must be identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from repo_paths import ROOT, write_section

SHIPPED_MODEL = ROOT / "MONAILabelApp" / "model" / "raddiagseg-demo"
HEADING = "## Demo preset: decode step overhead (issue 25, `benchmarks/decode_overhead.py`)"


class StepTimer:
    """Wraps `generation._decode_steps` to add up its thread CPU time, wall time and steps."""

    def __init__(self):
        from raddiagseg.model import generation

        self.generation, self.original = generation, generation._decode_steps
        self.cpu = self.wall = 0.0
        self.steps = 0

        def timed(*args, **kwargs):
            c0, w0 = time.thread_time(), time.perf_counter()
            steps = self.original(*args, **kwargs)
            self.cpu += time.thread_time() - c0
            self.wall += time.perf_counter() - w0
            self.steps += steps
            return steps

        generation._decode_steps = timed

    def take(self):
        out = (self.cpu / max(self.steps, 1), self.wall / max(self.steps, 1), self.steps)
        self.cpu = self.wall = 0.0
        self.steps = 0
        return out


def linear_floor(model, reps=200):
    """Thread CPU seconds of the LM's Linear layers (and head) on a one-token input: the matmuls of one step."""
    import torch

    linears = [m for m in model.language_model.causal_lm.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in linears]
    with torch.inference_mode():
        for m, x in zip(linears, inputs):
            m(x)
        c0 = time.thread_time()
        for _ in range(reps):
            for m, x in zip(linears, inputs):
                m(x)
    return (time.thread_time() - c0) / reps, len(linears), sum(m.weight.numel() for m in linears)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the shipped demo model)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--slices", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--results", action="store_true", help="write the numbers into benchmarks/RESULTS.md")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from latency import machine
    from raddiagseg import load_model, templates
    from raddiagseg.data import phantoms
    from raddiagseg.imaging import to_unit_range
    from raddiagseg.model.language_model import LanguageModel

    folder = args.model or SHIPPED_MODEL
    model = load_model(folder).eval()
    ct = phantoms.generate_ct(np.random.default_rng(0), "liver", size=256, slices=args.slices + 4, tumours=2)
    features = [model.encode_images([to_unit_range(ct.hu[i + 2].astype(np.float32), "ct", None)]) for i in range(args.slices)]
    question = templates.DEFAULT_QUESTION
    timer = StepTimer()
    fast = LanguageModel.step_masks
    import raddiagseg.model.language_model as lm_module

    project = lm_module._project
    matmul = {"cpu": 0.0}

    def timed_project(projection, x):  # the fused path's matmuls, timed where they run (weights not in cache)
        c0 = time.thread_time()
        y = project(projection, x)
        matmul["cpu"] += time.thread_time() - c0
        return y

    def answers(path):
        LanguageModel.step_masks = fast if path != "transformers" else (lambda self, attention_mask, dtype: None)
        LanguageModel.fused_decode = path in ("fused step", "compiled step")
        LanguageModel.compile_decode = path == "compiled step"
        lm_module._project = timed_project if path == "fused step" else project
        try:
            return [model.generate(None, question, features=f, max_new_tokens=args.max_new_tokens).token_ids for f in features]
        finally:
            LanguageModel.step_masks, LanguageModel.fused_decode, lm_module._project = fast, True, project
            LanguageModel.compile_decode = False

    paths = ("transformers", "step masks", "fused step", "compiled step")
    results = {path: [] for path in paths}
    tokens = {}
    compile_s = None
    for path in paths:  # warm-up, not timed
        started = time.perf_counter()
        tokens[path] = answers(path)
        if path == "compiled step":
            compile_s = time.perf_counter() - started
        timer.take()
    matmul["cpu"] = 0.0
    for _ in range(args.rounds):
        for path in paths:
            if answers(path) != tokens[path]:
                raise SystemExit(f"the {path} path answered differently between rounds")
            results[path].append(timer.take())
    same = all(tokens[path] == tokens["transformers"] for path in paths)
    fused_steps = sum(r[2] for r in results["fused step"])
    in_context = matmul["cpu"] / fused_steps
    floor, n_linear, n_weights = linear_floor(model)
    cpu = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    wall = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    steps = results["fused step"][0][2]
    lm_params = sum(p.numel() for p in model.language_model.parameters())
    rows = {"transformers": "transformers' Gemma-2 modules, masks built from the 2D mask each step",
            "step masks": "transformers' Gemma-2 modules, `LanguageModel.step_masks`",
            "fused step": "`LanguageModel.fused_step` (the default)",
            "compiled step": "`static_decode`, compiled (`compile_decode`, opt-in)"}
    lines = [HEADING, "",
             f"{machine()}; model {args.model or SHIPPED_MODEL.relative_to(ROOT)} (LM {lm_params / 1e6:.1f} M parameters), {args.slices} CT slices x "
             f"{args.rounds} rounds, greedy, {steps} decode steps per round, cached features; medians per token:", "",
             "| path | thread CPU ms/token | wall ms/token |", "|---|---|---|",
             *[f"| {rows[k]} | {cpu[k] * 1000:.2f} | {wall[k] * 1000:.2f} |" for k in paths], "",
             f"Answers of the four paths identical: {same}. Projection matmuls of the fused step where they run "
             f"(their weights read from memory each step): {in_context * 1000:.2f} ms per "
             f"token, so the rest of the per-token path (norms, rotary, KV cache, attention, logits, bookkeeping) costs "
             f"{(cpu['fused step'] - in_context) * 1000:.2f} ms (transformers' modules: "
             f"{(cpu['step masks'] - in_context) * 1000:.2f} ms; the compiled step: "
             f"{(cpu['compiled step'] - in_context) * 1000:.2f} ms, after {compile_s:.1f} s for its first answer, "
             f"compiling included). The {n_linear} Linear layers with the LM head "
             f"({n_weights / 1e6:.2f} M weights) timed alone, in a loop that keeps their weights in cache: "
             f"{floor * 1000:.2f} ms."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        write_section(ROOT / "benchmarks" / "RESULTS.md", HEADING, text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
