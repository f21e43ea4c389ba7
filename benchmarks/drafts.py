#!/usr/bin/env python
"""How often the previous slice's answer is a good draft for the next slice, and what it saves.

    .venv/bin/python benchmarks/drafts.py --threads 2                 # shipped demo model, CT phantoms
    .venv/bin/python benchmarks/drafts.py --model DIR --slices 32 --size 512

For consecutive slices of CT phantom volumes (liver and pancreas), every slice is answered twice
with the app's default question on the same cached features: plainly (greedy decoding), and with
the previous slice's answer as its draft (what `--conf answer_drafts recent` does for a slice not
asked about yet). Prints the draft tokens kept, how many answers were drafted whole, whether the
drafted answers and masks equal the plain ones, and the median generate time of both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from repo_paths import ROOT

SHIPPED_MODEL = ROOT / "MONAILabelApp" / "model" / "raddiagseg-demo"


def dice(a, b):
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SHIPPED_MODEL), help="model folder (default: the shipped demo model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "mixed"])
    p.add_argument("--slices", type=int, default=24, help="slices per volume")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    from latency import set_threads

    set_threads(args.threads)
    from latency import machine, precision
    from raddiagseg import templates
    from raddiagseg.data import phantoms
    from raddiagseg.imaging import to_unit_range

    from lib import infer_params
    from lib.model_store import load_for_serving

    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"{args.model} is not a model folder")
    model = load_for_serving(args.model, None, args.dtype)
    question, max_new = templates.DEFAULT_QUESTION, infer_params.DEFAULTS["max_new_tokens"]
    print(f"machine: {machine()}")
    print(f"model: {args.model}, preset {model.config.preset}, {precision(model)}; question: the app's default 3-step question")
    kept = offered = generated = whole = same = slices = 0
    dices, plain_s, drafted_s = [], [], []
    for organ, seed in (("liver", 1), ("pancreas", 2)):
        ct = phantoms.generate_ct(np.random.default_rng(seed), organ, size=args.size, slices=args.slices, tumours=2)
        previous = None
        for k in range(args.slices):
            features = model.encode_images([to_unit_range(ct.hu[k].astype(np.float32), "ct", None)])
            t0 = time.perf_counter()
            plain = model.generate(None, question, features=features, max_new_tokens=max_new)
            t1 = time.perf_counter()
            if previous is not None:
                drafted = model.generate(None, question, features=features, max_new_tokens=max_new, draft=previous)
                t2 = time.perf_counter()
                plain_s.append(t1 - t0)
                drafted_s.append(t2 - t1)
                slices += 1
                kept += drafted.draft["accepted"]
                offered += drafted.draft["offered"]
                generated += len(plain.token_ids) + 1  # eos counts: a kept eos saves its step too
                whole += drafted.draft["accepted"] == len(plain.token_ids) + 1
                equal = drafted.token_ids == plain.token_ids and len(drafted.segments) == len(plain.segments)
                same += equal
                if equal:
                    dices += [dice(a.mask, b.mask) for a, b in zip(drafted.segments, plain.segments)]
            previous = plain.token_ids
    print(f"{slices} slices drafted with the previous slice's answer ({args.slices} per volume, liver and pancreas, {args.size}x{args.size})")
    print(f"  draft tokens kept: {kept} of {offered} offered; {kept / generated:.0%} of the {generated} tokens generated (eos included)")
    print(f"  answers drafted whole (no decode step): {whole} of {slices}")
    print(f"  drafted answers equal to plain greedy answers: {same} of {slices}; mask Dice drafted vs plain: "
          f"min {min(dices) if dices else float('nan'):.4f} over {len(dices)} masks")
    print(f"  generate on cached features, median: plain {statistics.median(plain_s) * 1000:.1f} ms, "
          f"drafted {statistics.median(drafted_s) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
