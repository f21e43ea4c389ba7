#!/usr/bin/env python
"""Whole-volume inference: 64 slices batched (the app's path) vs a per-slice loop over the same slices.

    .venv/bin/python benchmarks/volume.py                   # demo model, 64 x 512 x 512 CT phantom
    .venv/bin/python benchmarks/volume.py --model DIR --slices 64 --batch-size 8 --threads 2

Both runs go through the app's ModelRunner (MONAILabelApp/lib/model_runner.py) with the feature
cache off, so every slice is encoded in both:

- batched: `runner.answer(all slices, batch_size=B)`: slices go through the encoders B at a time,
  the LM decodes B answers together (KV cache, left padding), and only slices whose answer has
  seg tokens reach the mask decoder (one decoder call per batch that has any);
- loop: `runner.answer([slice])` once per slice (one encode, one generate each).

Prints both times, the ratio batched/loop (target <= 0.5), how many slices reached the mask
decoder and how many decoder calls each run made, and whether both runs gave the same answers.
--answer-drafts recent adds a third run: batched, as the app answers a volume it has not seen with
`--conf answer_drafts recent` (each batch drafted with the previous batch's last answer; a fresh cache).
--model DIR: default MONAILabelApp/model/raddiagseg-demo when it exists, else an untrained
demo-preset model (timings depend on the architecture; answers, and so which slices skip the
mask decoder, depend on the weights).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from repo_paths import ROOT
APP = ROOT / "MONAILabelApp"
SHIPPED_MODEL = APP / "model" / "raddiagseg-demo"


class CountingEncoder:
    """Counts encode_images calls and slices on a model, without changing what it returns."""

    def __init__(self, model):
        self.calls = self.images = 0
        original = model.encode_images

        def encode_images(images):
            self.calls += 1
            self.images += len(images)
            return original(images)

        model.encode_images = encode_images


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the shipped demo model, else an untrained demo-preset model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "mixed"])
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=None, help="default: the app's default batch_size")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the app's default")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--answer-drafts", default="off", choices=["off", "recent"], help="recent: also time a drafted batched run")
    args = p.parse_args()
    from latency import set_threads

    set_threads(args.threads)
    import torch

    from latency import build_random, machine, precision
    from raddiagseg import templates
    from raddiagseg.data import phantoms
    from raddiagseg.imaging import to_unit_range

    from lib import infer_params
    from lib.slice_cache import SliceCache
    from lib.model_runner import ModelRunner
    from lib.model_store import load_for_serving

    batch_size = args.batch_size or infer_params.DEFAULTS["batch_size"]
    max_new = args.max_new_tokens or infer_params.DEFAULTS["max_new_tokens"]
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="raddiag-volume-") as tmp:
        folder = Path(args.model) if args.model else SHIPPED_MODEL
        if not (folder / "config.json").is_file():
            if args.model:
                raise SystemExit(f"{folder} is not a model folder")
            torch.manual_seed(0)
            folder = Path(tmp) / "random-demo"
            build_random("demo", torch.float32).save_pretrained(str(folder))
            print("model: no shipped demo model: an untrained demo-preset model (timings depend on the architecture only; "
                  "answers, and so the mask-decoder skips, depend on weights)")
        model = load_for_serving(folder, None, args.dtype)
        print(f"model: {folder}, preset {model.config.preset}, {precision(model)}")

        class Store:  # what ModelRunner needs of the app's ModelStore: the loaded model and its version
            def get(self):
                return model, "bench"

        ct = phantoms.generate_ct(np.random.default_rng(1), "liver", size=args.size, slices=args.slices, tumours=2)
        units = [to_unit_range(ct.hu[k].astype(np.float32), "ct", None) for k in range(args.slices)]
        with_tumour = int(sum(bool((ct.label[k] == 2).any()) for k in range(args.slices)))
        print(f"volume: {args.slices} slices of {args.size}x{args.size} (liver phantom, tumour in {with_tumour} slices); "
              f"question: the app's default 3-step question; batch_size {batch_size}, max_new_tokens {max_new}")
        questions = [templates.DEFAULT_QUESTION] * len(units)
        options = {"max_new_tokens": max_new}
        runner = ModelRunner(Store(), SliceCache(0))  # cache off: both runs encode every slice
        counter = CountingEncoder(model)
        runner.answer(units[:2], questions[:2], options, batch_size=2)  # warm-up, not timed

        runs = {}
        for name in ("loop", "batched", "loop", "batched"):  # interleaved, so drifting load hits both alike
            calls0, images0, decoder0 = counter.calls, counter.images, model.mask_decoder_calls
            t0 = time.perf_counter()
            if name == "batched":
                results, stats = runner.answer(units, questions, options, batch_size=batch_size)
                runs["batched_stages"] = stats["model"]
            else:
                results, loop_stages = [], {}
                for unit, question in zip(units, questions):
                    one, stats = runner.answer([unit], [question], options, batch_size=1)
                    results.extend(one)
                    for k, v in stats["model"].items():
                        loop_stages[k] = loop_stages.get(k, 0.0) + v
            seconds = time.perf_counter() - t0
            runs.setdefault(name, []).append(seconds)
            if name == "loop":
                runs["loop_stages"] = loop_stages
            info = {"results": results, "encode_calls": counter.calls - calls0, "encoded": counter.images - images0,
                    "decoder_calls": model.mask_decoder_calls - decoder0}
            runs[name + "_info"] = info
        for name in ("batched", "loop"):
            info = runs[name + "_info"]
            masked = sum(1 for r in info["results"] if r.segments)
            tokens = sum(len(r.token_ids) for r in info["results"])
            print(f"{name:8s}: {min(runs[name]):.2f} s (best of {len(runs[name])}: {', '.join(f'{s:.2f}' for s in runs[name])}); "
                  f"encoder calls {info['encode_calls']} for {info['encoded']} slices; {tokens} tokens generated; "
                  f"{masked} slices with masks, the other {len(units) - masked} skipped the mask decoder; "
                  f"mask decoder calls {info['decoder_calls']}")
        for name in ("batched", "loop"):
            stages = {k: v for k, v in runs[name + "_stages"].items() if k != "decode_per_token"}
            print(f"  {name} stage sums [s] (last run): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        same = sum(a.answer == b.answer for a, b in zip(runs["batched_info"]["results"], runs["loop_info"]["results"]))
        print(f"answers identical in batched and loop runs: {same} of {len(units)}")
        ratio = min(runs["batched"]) / min(runs["loop"])
        print(f"batched / loop: {ratio:.2f}  (target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")
        if args.answer_drafts == "recent":
            times = []
            for _ in range(2):
                drafting = ModelRunner(Store(), SliceCache(2 * len(units)), drafts="recent")  # a volume not seen before
                t0 = time.perf_counter()
                drafted, stats = drafting.answer(units, questions, options, batch_size=batch_size)
                times.append(time.perf_counter() - t0)
            same = sum(a.answer == b.answer for a, b in zip(drafted, runs["batched_info"]["results"]))
            counts = stats["counts"]
            print(f"batched, answer drafts recent: {min(times):.2f} s (best of 2: {', '.join(f'{t:.2f}' for t in times)}); "
                  f"draft tokens kept {counts['draft_tokens_kept']} of {counts['draft_tokens']}; decode {stats['model']['decode']:.2f} s; "
                  f"answers identical to the undrafted batched run: {same} of {len(units)}")
            print(f"drafted batched / batched: {min(times) / min(runs['batched']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
