#!/usr/bin/env python
"""Weight-only int8 (`raddiagseg.model.quantize`) against the unquantized model on the same phantom cases.

    nice -n 10 .venv/bin/python benchmarks/int8_lm.py --preset paper --cases 40 --threads 2 --results   # ~6 GB
    .venv/bin/python benchmarks/int8_lm.py --model MONAILabelApp/model/raddiagseg-demo --cases 40

Each variant runs in its own process (so peak RSS is its own), loaded as the app serves it (`load_for_serving`:
bf16 for the paper preset), then quantized for int8 (`--mode int8`: the LM and its head; `int8-all`: every
Linear). Per case (CT and X-ray phantom slices): cold = encode_images + generate; repeat = generate on the cached
features with the cold answer as its draft (the app's repeat question). Reported: the share of cases whose
answer token ids are identical, the mean Dice of the masks of identical answers, median cold and repeat
seconds, their int8/base ratios, peak RSS. --preset paper builds an untrained paper model (random weights; a
random LM's next-token scores are nearly flat, so identical answers there are a harsh test of rounding, not a
forecast for real weights). --force-answer scripts the answer as benchmarks/latency.py does (the LM still runs
every step; timings only, answers trivially identical).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from repo_paths import ROOT, write_section

HEADING = "## Weight-only int8 for the paper LM (issue 25, `benchmarks/int8_lm.py`)"


def cases(n):
    """n phantom slices in [0, 1]: CT slices of liver and pancreas volumes (512 px) and chest X-rays, alternating."""
    from raddiagseg.data import phantoms
    from raddiagseg.imaging import to_unit_range

    rng = np.random.default_rng(0)
    ct_units = []
    for task in ("liver", "pancreas"):
        ct = phantoms.generate_ct(rng, task, size=512, slices=max(4, (n + 3) // 3), tumours=2)
        ct_units += [to_unit_range(ct.hu[k].astype(np.float32), "ct", None) for k in range(ct.hu.shape[0])]
    xrays = [to_unit_range(phantoms.generate_xray(rng, kind).image.astype(np.float32), "xray", None)
             for kind in phantoms.XRAY_CLASSES * ((n + 8) // 9)]
    units, c, x = [], iter(ct_units), iter(xrays)
    for i in range(n):
        units.append(next(x) if i % 3 == 2 else next(c))
    return units


def run_variant(folder, variant, out, n, max_new, force):
    """Child process: load, (quantize), answer the cases cold and repeated -> JSON + masks .npz."""
    import torch

    from latency import FORCED_ANSWER, scripted_logits
    from lib.model_store import load_for_serving
    from raddiagseg import templates

    t0 = time.perf_counter()
    model = load_for_serving(folder, "cpu", "auto", None if variant == "base" else variant)
    load_s = time.perf_counter() - t0
    reset = lambda: None  # noqa: E731
    if force:
        reset = scripted_logits(model, model.processor.answer_ids(templates.vqaseg_answer(*FORCED_ANSWER)))
    question = templates.DEFAULT_QUESTION
    records, masks = [], {}
    for i, unit in enumerate(cases(n)):
        reset()
        t0 = time.perf_counter()
        features = model.encode_images([unit])
        cold = model.generate(unit, question, features=features, max_new_tokens=max_new)
        cold_s = time.perf_counter() - t0
        reset()
        t0 = time.perf_counter()
        model.generate(unit, question, features=features, max_new_tokens=max_new, draft=cold.token_ids)
        records.append({"tokens": cold.token_ids, "cold_s": cold_s, "repeat_s": time.perf_counter() - t0,
                        "decode_per_token_s": cold.latencies.get("decode_per_token", 0.0)})
        for k, s in enumerate(cold.segments):
            masks[f"{i}_{k}"] = np.packbits(s.mask)
        print(f"{variant} case {i}: {cold_s:.2f} s cold, {records[-1]['repeat_s']:.2f} s repeat", flush=True)
    np.savez_compressed(str(out) + ".npz", **masks)
    Path(out).write_text(json.dumps({
        "variant": variant, "load_s": load_s, "records": records, "dtype": str(next(model.language_model.parameters()).dtype),
        "quantization": getattr(model, "quantization", None), "threads": torch.get_num_threads(),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}))


def dice(a, b):
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def compare(base, quant):
    """Identical-answer share and the Dice of the masks of identical answers."""
    same = [a["tokens"] == b["tokens"] for a, b in zip(base["records"], quant["records"])]
    bm, qm = np.load(base["path"] + ".npz"), np.load(quant["path"] + ".npz")
    dices = [dice(np.unpackbits(bm[k]), np.unpackbits(qm[k])) for k in bm.files if k in qm.files
             and same[int(k.split("_")[0])]]
    return {"identical": sum(same) / len(same), "cases": len(same), "masks_compared": len(dices),
            "mask_dice_mean": float(np.mean(dices)) if dices else float("nan"),
            "mask_dice_min": float(np.min(dices)) if dices else float("nan")}


def median(records, key):
    return statistics.median(r[key] for r in records)


def main():
    if len(sys.argv) == 8 and sys.argv[1] == "--run":
        _, _, folder, variant, out, n, max_new, force = sys.argv
        return run_variant(folder, variant, out, int(n), int(max_new), force == "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: an untrained model of --preset, built into a temp folder)")
    p.add_argument("--preset", default="paper", choices=["demo", "paper"])
    p.add_argument("--mode", default="int8", choices=["int8", "int8-all"])
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force-answer", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--results", action="store_true")
    args = p.parse_args()
    from latency import machine, set_threads

    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="raddiag-int8-") as tmp:
        folder = args.model
        if folder is None:
            folder = str(Path(tmp) / f"random-{args.preset}")
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--build-random", args.preset, folder], check=True)
        runs = {}
        for variant in ("base", args.mode):
            out = str(Path(tmp) / variant)
            subprocess.run([sys.executable, __file__, "--run", folder, variant, out, str(args.cases), str(args.max_new_tokens),
                            "1" if args.force_answer else "0"], check=True)
            runs[variant] = dict(json.loads(Path(out).read_text()), path=out)
        base, quant = runs["base"], runs[args.mode]
        c = compare(base, quant)
    report = {"model": str(args.model or f"untrained {args.preset}"), "mode": args.mode, "comparison": c,
              "base": {k: v for k, v in base.items() if k != "records"}, "int8": {k: v for k, v in quant.items() if k != "records"}}
    for name, run in (("base", base), ("int8", quant)):
        report[name].update(cold_s=median(run["records"], "cold_s"), repeat_s=median(run["records"], "repeat_s"),
                            decode_per_token_s=median(run["records"], "decode_per_token_s"))
    b, q = report["base"], report["int8"]
    lines = [HEADING, "", f"{machine()}; model {report['model']} ({b['dtype']}), mode {args.mode}, {c['cases']} phantom "
             f"cases (CT 512 px and X-rays), default 3-step question, max_new_tokens {args.max_new_tokens}"
             + (", scripted answer" if args.force_answer else "") + ":", "",
             "| | base | int8 | int8/base |", "|---|---|---|---|",
             f"| cold answer (median s) | {b['cold_s']:.2f} | {q['cold_s']:.2f} | {q['cold_s'] / b['cold_s']:.2f} |",
             f"| repeat answer (median s) | {b['repeat_s']:.2f} | {q['repeat_s']:.2f} | {q['repeat_s'] / b['repeat_s']:.2f} |",
             f"| decode per token (ms) | {b['decode_per_token_s'] * 1000:.1f} | {q['decode_per_token_s'] * 1000:.1f} | "
             f"{q['decode_per_token_s'] / max(b['decode_per_token_s'], 1e-9):.2f} |",
             f"| peak RSS (GB) | {b['peak_rss_gb']:.2f} | {q['peak_rss_gb']:.2f} | {q['peak_rss_gb'] / b['peak_rss_gb']:.2f} |", "",
             f"Identical answers: {c['identical'] * 100:.0f} % of {c['cases']}; masks of identical answers: Dice mean "
             f"{c['mask_dice_mean']:.3f}, min {c['mask_dice_min']:.3f} over {c['masks_compared']} masks."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.results:
        write_section(ROOT / "benchmarks" / "RESULTS.md", HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
