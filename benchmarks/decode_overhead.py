#!/usr/bin/env python
"""What one decode step of a small LM costs against its arithmetic, before and after the step-mask fast path.

    nice -n 10 .venv/bin/python benchmarks/decode_overhead.py [--model DIR] [--rounds 4] [--results]

Greedy answers to the app's default question on CT phantom slices (cached image features, so only the LM
runs), the two paths interleaved round by round in this one process:

- before: transformers builds the full and sliding attention masks from the 2D mask at every step
  (`LanguageModel.step_masks` switched off);
- after: `LanguageModel.step_masks` hands it the (B, 1, 1, L) masks directly (the default).

Per token it reports the thread's CPU time (robust on a shared box: waiting for a core is not counted) and the
wall time, and the arithmetic floor: every Linear of the LM and its head run once on a one-token input, the
same matmuls a step makes, timed alone. Answers (token ids) of both paths must be identical.
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

    def answers(path):
        LanguageModel.step_masks = fast if path == "after" else (lambda self, attention_mask, dtype: None)
        try:
            return [model.generate(None, question, features=f, max_new_tokens=args.max_new_tokens).token_ids for f in features]
        finally:
            LanguageModel.step_masks = fast

    results = {"before": [], "after": []}
    tokens = {}
    for path in ("before", "after"):  # warm-up, not timed
        tokens[path] = answers(path)
        timer.take()
    for _ in range(args.rounds):
        for path in ("before", "after"):
            if answers(path) != tokens[path]:
                raise SystemExit(f"the {path} path answered differently between rounds")
            results[path].append(timer.take())
    same = tokens["before"] == tokens["after"]
    floor, n_linear, n_weights = linear_floor(model)
    cpu = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    wall = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    steps = results["after"][0][2]
    lm_params = sum(p.numel() for p in model.language_model.parameters())
    lines = [HEADING, "",
             f"{machine()}; model {args.model or SHIPPED_MODEL.relative_to(ROOT)} (LM {lm_params / 1e6:.1f} M parameters), {args.slices} CT slices x "
             f"{args.rounds} rounds, greedy, {steps} decode steps per round, cached features; medians per token:", "",
             "| path | thread CPU ms/token | wall ms/token |", "|---|---|---|",
             f"| before (transformers builds the masks each step) | {cpu['before'] * 1000:.2f} | {wall['before'] * 1000:.2f} |",
             f"| after (`LanguageModel.step_masks`) | {cpu['after'] * 1000:.2f} | {wall['after'] * 1000:.2f} |", "",
             f"after/before (CPU): {cpu['after'] / cpu['before']:.2f}; arithmetic floor (the {n_linear} Linear layers, "
             f"{n_weights / 1e6:.2f} M weights, on one token): {floor * 1000:.2f} ms, so a step costs "
             f"{cpu['after'] / floor:.1f}x its matmuls (before: {cpu['before'] / floor:.1f}x); answers identical: {same}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        write_section(ROOT / "benchmarks" / "RESULTS.md", HEADING, text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
