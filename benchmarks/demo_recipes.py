"""Issue 4: compare demo-model recipes (`raddiagseg demo` with different options) on the same phantoms.

Each recipe is one full `raddiagseg demo` build (CLIP alignment, pretrain, finetune, held-out score)
in its own folder; all share one training and one held-out phantom set, built once. Recipes run in
parallel (`--jobs`), each under `--timeout`; the table reports what finished. Per-source detection
(liver vs pancreas tumours, X-ray classes) comes from the score's per-sample CSV.

Usage:
  .venv/bin/python benchmarks/demo_recipes.py --work /tmp/recipes [--jobs 4] [--device cuda] \
      [--recipe NAME='--model-option clip.depth=4 --finetune-steps 3000'] ...
Without --recipe it runs RECIPES below.
"""

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from repo_paths import ROOT

# Each one affordable on the 2-core CPU within the demo's 45-minute budget (v4, "base", took 30 min).
RECIPES = {
    "base": "",
    "q64": "--model-option projector.num_queries=64",
    "d4": "--model-option clip.depth=4",
    "d4q64": "--model-option clip.depth=4 --model-option projector.num_queries=64",
    "a2k": "--align-steps 2000",
    "ft3k": "--finetune-steps 3000 --val-samples 256",
    "d4q64ft2500": "--model-option clip.depth=4 --model-option projector.num_queries=64 --finetune-steps 2500 --val-samples 256",
}
METRICS = ("detection_f1", "diagnosis_f1", "dice_org", "dice_abn", "refseg_dice")


def shared_data(work, args):
    """Build the training and held-out phantoms once (the demo's sizes and seeds)."""
    from raddiagseg.data.builder import build_phantom_dataset
    from raddiagseg.training.demo import TEST_DATA, TRAIN_DATA

    for name, seed, sizes in (("data-train", args.train_seed, TRAIN_DATA), ("data-heldout", args.test_seed, TEST_DATA)):
        if not (work / name / "manifest.jsonl").is_file():
            t = time.perf_counter()
            build_phantom_dataset(work / name, seed=seed, **sizes)
            print(f"[recipes] built {name} in {time.perf_counter() - t:.0f} s", flush=True)


def run_recipe(name, options, work, args):
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    for data in ("data-train", "data-heldout"):
        link = folder / data
        if not link.exists():
            link.symlink_to(work / data)
    cmd = [sys.executable, "-m", "raddiagseg", "demo", "--work", str(folder), "--out", str(folder / "model"), "--resume",
           "--precision", args.precision, "--num-workers", str(args.num_workers), "--train-seed", str(args.train_seed),
           "--test-seed", str(args.test_seed), *shlex.split(options)]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'trainer'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    started = time.perf_counter()
    timeout = args.timeout if args.deadline is None else min(args.timeout, args.deadline - (time.time() - args.started))
    with open(folder / "log.txt", "w") as log:
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=max(1, timeout)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - started
    print(f"[recipes] {name}: exit {code} after {wall / 60:.1f} min", flush=True)
    row = summarise(name, options, folder, code, wall)
    with open(Path(args.summary) / "partial.jsonl", "a") as f:  # survives a kill of the whole run
        f.write(json.dumps(row) + "\n")
    return row


def summarise(name, options, folder, code, wall):
    out = {"recipe": name, "options": options, "exit": code, "wall_min": round(wall / 60, 1)}
    report = folder / "model" / "heldout_report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        for modality in ("ct", "xray"):
            for key in METRICS:
                value = (data.get(modality) or {}).get(key)
                out[f"{modality}_{key}"] = None if value is None else round(value, 3)
    table = folder / "model" / "heldout_report.csv"
    if table.is_file():
        hits, totals = Counter(), Counter()
        for row in csv.DictReader(table.open()):
            if row["task"] != "vqaseg" or row["gt_detection"] != "True":
                continue
            group = row["source"] + ":" + row["gt_diagnosis"]
            totals[group] += 1
            hits[group] += row["pred_diagnosis"] == row["gt_diagnosis"]
        out["diagnosis_recall"] = {g: f"{hits[g]}/{totals[g]}" for g in sorted(totals)}
    align = folder / "aligned" / "alignment.json"
    if align.is_file():
        summary = json.loads(align.read_text())
        out["align_val_acc"] = summary.get("val_acc")
        out["align_val_per_caption"] = {k: round(v, 2) for k, v in (summary.get("val_acc_per_caption") or {}).items()}
    for stage in ("pretrain", "finetune"):
        result, metrics = folder / stage / "result.json", folder / stage / "metrics.csv"
        if result.is_file():
            r = json.loads(result.read_text())
            out[f"{stage}_best"] = [r.get("best_metric"), r.get("best_step")]
        if metrics.is_file():  # (step, validation metric, steps/s) of each check, also for a stopped run
            rows = list(csv.DictReader(metrics.open()))
            out[f"{stage}_val"] = [(int(r["step"]), round(float(r["val_metric"]), 3)) for r in rows if r.get("val_metric")]
            if rows:
                out[f"{stage}_steps_per_s"] = round(int(rows[-1]["step"]) / max(1e-9, float(rows[-1]["wall_s"])), 2)
    return out


def markdown(rows):
    head = ["recipe", "min"] + [f"{m} {k}" for m in ("ct", "xray") for k in METRICS[:4]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["recipe"], str(r["wall_min"])] + [str(r.get(f"{m}_{k}", "–")) for m in ("ct", "xray") for k in METRICS[:4]]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        lines.append(f"\n{r['recipe']} ({r['options'] or 'defaults'}, exit {r['exit']}): diagnosis recall "
                     f"{r.get('diagnosis_recall')}; alignment {r.get('align_val_per_caption')}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--recipe", action="append", default=[], metavar="NAME=OPTIONS", help="a `raddiagseg demo` option string")
    p.add_argument("--only", help="comma-separated names from the built-in RECIPES")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="OMP threads per recipe")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader workers per recipe")
    p.add_argument("--device")
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    p.add_argument("--timeout", type=float, default=3600, help="seconds per recipe")
    p.add_argument("--deadline", type=float, help="seconds from the start after which every recipe still running is stopped")
    p.add_argument("--train-seed", type=int, default=1234)
    p.add_argument("--test-seed", type=int, default=98765)
    p.add_argument("--summary", help="write summary.json and summary.md into this folder (default: --work)")
    args = p.parse_args(argv)
    args.started = time.time()
    recipes = dict(r.split("=", 1) for r in args.recipe) if args.recipe else dict(RECIPES)
    if args.only:
        recipes = {k: RECIPES[k] for k in args.only.split(",")}
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.summary = str(Path(args.summary or work).resolve())
    Path(args.summary).mkdir(parents=True, exist_ok=True)
    shared_data(work, args)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda item: run_recipe(item[0], item[1], work, args), recipes.items()))
    summary = Path(args.summary)
    (summary / "summary.json").write_text(json.dumps(rows, indent=1))
    (summary / "summary.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
