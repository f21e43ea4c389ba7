"""Issue 10: the model options against the plain model on held-out phantoms, one table in RESULTS.md.

Variants (each row of the table):
  plain         the given model as it is (e.g. the shipped demo model)
  +TTS(m,n)     the same model with test-time scaling: m answers x n perturbed prompts
  FT            a control: the plain model fine-tuned for --steps on the same data as the options below
  FT+RVLS2M     fine-tuned with RVLS2M region prompts (config rvls2m on)
  FT+CoT        fine-tuned on chain-of-thought answers, asked for reasoning (templates.COT_QUESTION)

Fine-tunes start from --model, use phantoms of --train-seed (the demo's training seed) with the
task mix --ratio (reasonseg included, so reasoning segmentation is learned), and the same steps,
learning rate and seed; evaluation uses phantoms of --test-seed (never trained on), one sample at a
time so that latency is per sample. Metrics: Dice-Org / Dice-Abn / diagnosis F1 / detection F1
(paper 001), gIoU / cIoU over 3-step and Ref-Seg masks, and reasoning-segmentation gIoU / cIoU /
accuracy (paper 003 / 002).

Usage:
  .venv/bin/python benchmarks/options.py --model MONAILabelApp/model/raddiagseg-demo --work /tmp/options \
      [--steps 150] [--samples 80] [--tts 4x4] [--device cpu|cuda] [--variants plain,tts,ft,rvls2m,cot]
"""

import argparse
import json
import logging
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from repo_paths import ROOT

SECTION = "## Model options (issue 10): plain vs +RVLS2M vs +TTS vs +CoT"
VARIANTS = ("plain", "tts", "ft", "rvls2m", "cot")
log = logging.getLogger("options")


def build_data(work, args):
    from raddiagseg.data.builder import build_phantom_dataset

    out = {}
    for name, seed, ct, xr in (("test", args.test_seed, args.test_ct_volumes, args.test_xrays),
                               ("train", args.train_seed, args.train_ct_volumes, args.train_xrays)):
        manifest = work / name / "manifest.jsonl"
        if not manifest.is_file():
            log.info("building %s phantoms (seed %d)", name, seed)
            build_phantom_dataset(work / name, ct_volumes=ct, xrays=xr, seed=seed, ct_slices=args.ct_slices,
                                  refseg_images=max(4, ct // 2), vqa_images=10, reasonseg=True)
        out[name] = manifest
    return out


def eval_rows(manifest, samples):
    """Evenly spread held-out rows: `samples` 3-step, samples/2 reasoning-segmentation, samples/4 Ref-Seg (all splits)."""
    import numpy as np

    from raddiagseg.data.records import read_manifest

    rows = read_manifest(manifest, None, base=True)
    chosen = []
    for task, n in (("vqaseg", samples), ("reasonseg", samples // 2), ("refseg", samples // 4)):
        pool = [r for r in rows if r["task"] == task]
        if len(pool) > n:
            pool = [pool[i] for i in np.unique(np.linspace(0, len(pool) - 1, n).round().astype(int))]
        chosen += pool
    return chosen


def finetune(name, model_dir, train_manifest, work, args, rvls2m=None, cot=False):
    from raddiagseg.training import train
    from raddiagseg.training.config import TrainConfig

    run = work / "runs" / name
    final = run / "final"
    if (final / "config.json").is_file():
        log.info("reusing %s", final)
        return final, json.loads((run / "options_train.json").read_text())
    config = TrainConfig(
        data=str(train_manifest), out=str(run), stage="finetune", preset="demo", init=str(model_dir),
        max_steps=args.steps, lr=args.lr, batch_size=args.batch_size, warmup=max(1, args.steps // 10),
        ratio=dict(args.ratio), val_every=args.steps, val_samples=16, seed=0, device=args.device,
        rvls2m=rvls2m, cot=cot, progress_bar=False, num_workers=args.num_workers,
    )
    t0 = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - t0
    from raddiagseg import load_model

    import torch

    model = load_model(result.last_checkpoint)
    model.save_pretrained(final, dtype=torch.float16)  # as the shipped demo model
    where = torch.cuda.get_device_name() + " (bf16 autocast)" if str(args.device).startswith("cuda") else "CPU (fp32)"
    info = {"steps": result.steps, "seconds": round(seconds, 1), "trained_on": where}
    (run / "options_train.json").write_text(json.dumps(info))
    return final, info


def evaluate(model, rows, cot=False, tts=None, max_new_tokens=128, rvls2m=None):
    """Score every row, one generate (or generate_tts) call per sample -> (report, per-sample seconds of 3-step rows,
    TTS agreement summary or None). tts = (m, n, prompt noise)."""
    import torch

    from raddiagseg.evaluation import scoring
    from raddiagseg.evaluation.predict import sample_image, sample_question

    records, latency, agreements = [], [], []
    model.eval()
    with torch.inference_mode():
        for row in rows:
            image = sample_image(row)
            question = sample_question(row, cot)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if tts:
                result = model.generate_tts(image, question, num_answers=tts[0], num_masks=tts[1], prompt_noise=tts[2],
                                            max_new_tokens=max_new_tokens, rvls2m=rvls2m)
                agreements.append(result.agreement)
            else:
                result = model.generate(image, question, max_new_tokens=max_new_tokens, rvls2m=rvls2m)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            if row["task"] == "vqaseg":
                latency.append(time.perf_counter() - t0)
            prediction = {"id": row["id"], "answer": result.answer, "masks": {s.token: s.mask for s in result.segments}}
            records.append(scoring.score_sample(row, prediction, Path(row["_base"])))
    summary = None
    if agreements:
        masks = [m for a in agreements for m in a["masks"]]
        summary = {"answer_share": statistics.fmean(a["answer"] for a in agreements),
                   "unanimous": statistics.fmean(a["answer"] == 1.0 for a in agreements),
                   "mask_iou": statistics.fmean(masks) if masks else None,
                   "uncertainty": statistics.fmean(a["uncertainty"] for a in agreements)}
    return scoring.build_report(records, scoring.run_settings()), latency, summary


def model_digest(folder):
    import hashlib

    digest = hashlib.sha256()
    with open(Path(folder) / "model.safetensors", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def fmt(value):
    return "–" if value is None else f"{value:.3f}"


def table(results):
    head = ("| Variant | Dice-Org | Dice-Abn | Diag. F1 | Det. F1 | gIoU | cIoU | ReasonSeg gIoU | ReasonSeg cIoU "
            "| ReasonSeg Acc | Latency p50 (s/sample) |")
    lines = [head, "|" + "---|" * 11]
    for name, entry in results.items():
        o = entry["report"]["overall"]
        cells = [name] + [fmt(o.get(k)) for k in ("dice_org", "dice_abn", "diagnosis_f1", "detection_f1", "giou", "ciou",
                                                   "reasonseg_giou", "reasonseg_ciou", "reasonseg_acc")]
        cells.append(f"{entry['latency_p50']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(path, body, heading=SECTION):
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the other sections as they are."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(heading) + r"\n.*?(?=\n## |\Z)", re.S)
    section = heading + "\n\n" + body.strip() + "\n"
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="model folder to start from (the shipped demo model)")
    p.add_argument("--work", type=Path, default=Path("/tmp/raddiag-options"), help="phantoms, fine-tune runs, options.json")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=150, help="fine-tune steps of FT, FT+RVLS2M and FT+CoT")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratio", default="vqaseg=0.5,reasonseg=0.3,vqa=0.2", help="fine-tune task mix")
    p.add_argument("--rvls2m-grid", type=int, default=8)
    p.add_argument("--rvls2m-top-k", type=int, default=8)
    p.add_argument("--tts", default="4x4", help="test-time scaling m x n (answers x perturbed prompts per answer); "
                   "several, comma-separated, each optionally with its prompt noise: 4x4,4x4:0.3")
    p.add_argument("--samples", type=int, default=80, help="held-out 3-step samples (plus half as many reasonseg, a quarter refseg)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the fine-tunes")
    p.add_argument("--train-seed", type=int, default=1234)
    p.add_argument("--test-seed", type=int, default=98765)
    p.add_argument("--train-ct-volumes", type=int, default=40)
    p.add_argument("--train-xrays", type=int, default=200)
    p.add_argument("--test-ct-volumes", type=int, default=10)
    p.add_argument("--test-xrays", type=int, default=60)
    p.add_argument("--ct-slices", type=int, default=12)
    p.add_argument("--title", default="", help="added to the RESULTS.md section heading (e.g. the machine), one section per title")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="markdown file to update ('-': print only)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="OPTIONS_JSON",
                   help="run nothing: write one table from the options.json of earlier runs with the same settings "
                        "(e.g. variant subsets run in parallel, each with its own --work)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from raddiagseg import load_model
    from raddiagseg.training.config import parse_ratio_text

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.ratio = parse_ratio_text(args.ratio, "finetune")
    tts_specs = []
    for spec in args.tts.lower().split(","):
        size, _, noise = spec.partition(":")
        m, n = (int(v) for v in size.split("x"))
        tts_specs.append((m, n, float(noise) if noise else 0.05))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    data = build_data(args.work, args)
    rows = eval_rows(data["test"], args.samples)
    counts = {t: sum(r["task"] == t for r in rows) for t in ("vqaseg", "reasonseg", "refseg")}
    log.info("held-out rows: %s", counts)

    results, training, commands = {}, {}, []
    this_command = "python benchmarks/options.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.merge:
        for part in args.merge:
            if not part.is_file():
                log.warning("%s does not exist (that run ended before its first variant): left out", part)
                continue
            saved = json.loads(part.read_text())
            results.update(saved["results"])
            training.update(saved["training"])
            commands.append(saved.get("command", f"(results of {part})"))
        variants = []
    else:
        commands.append(this_command)

    def run(name, model, **kw):
        t0 = time.perf_counter()
        report, latency, agreement = evaluate(model.to(args.device), rows, max_new_tokens=args.max_new_tokens, **kw)
        results[name] = {"report": report, "latency_p50": statistics.median(latency) if latency else float("nan"),
                         "tts_agreement": agreement,
                         "latency_mean": statistics.fmean(latency) if latency else float("nan"),
                         "eval_seconds": round(time.perf_counter() - t0, 1)}
        log.info("%s: %s", name, {k: report["overall"].get(k) for k in ("dice_org", "dice_abn", "diagnosis_f1", "giou", "reasonseg_giou")})
        (args.work / "options.json").write_text(json.dumps({"results": results, "training": training,
                                                            "command": this_command}, indent=1, default=str))

    base = load_model(args.model, device=args.device) if variants else None
    if "plain" in variants:
        run("plain", base)
    if "tts" in variants:
        for m, n, noise in tts_specs:
            run(f"+TTS({m},{n})" + (f", noise {noise:g}" if noise != 0.05 else ""), base, tts=(m, n, noise))
    del base
    plans = {"ft": ("FT", None, False),
             "rvls2m": ("FT+RVLS2M", {"enabled": True, "grid": args.rvls2m_grid, "top_k": args.rvls2m_top_k}, False),
             "cot": ("FT+CoT", None, True)}
    for key, (name, rvls2m, cot) in plans.items():
        if key not in variants:
            continue
        folder, info = finetune(key, args.model, data["train"], args.work, args, rvls2m=rvls2m, cot=cot)
        training[name] = info
        model = load_model(folder, device=args.device)
        run(name, model, cot=cot)
        if key == "rvls2m":  # the same weights with the region prompts turned off at inference (infer param rvls2m=off)
            run("FT+RVLS2M, off at inference", model, rvls2m=False)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    body = [
        "`benchmarks/options.py` evaluates each option of the same model on held-out phantoms "
        f"(seed {args.test_seed}, never trained on): {counts['vqaseg']} 3-step (VQA-Seg) samples, {counts['reasonseg']} "
        f"reasoning-segmentation samples, {counts['refseg']} Ref-Seg samples, one sample per model call.",
        "",
        "```", *(f"$ {c}" for c in commands), *([f"$ {this_command}"] if args.merge else []), "```", "",
        f"Machine: {device}. Model: `{args.model}`. Fine-tunes (FT rows): {args.steps} steps from that model, batch "
        f"{args.batch_size}, lr {args.lr}, task mix {args.ratio}, phantoms of seed {args.train_seed} "
        f"({args.train_ct_volumes} CT volumes, {args.train_xrays} X-rays); "
        + "; ".join(f"{k} {v['seconds']} s on {v.get('trained_on', '?')}" for k, v in training.items())
        + ("." if training else "no fine-tunes run.") + f" Model weights sha256 {model_digest(args.model)}.",
        f"RVLS2M: grid {args.rvls2m_grid} x {args.rvls2m_grid}, top-{args.rvls2m_top_k} cells. TTS(m, n): m answers "
        "(greedy + m - 1 sampled at T = 0.7) x n perturbed prompts (Gaussian noise of `noise` x the state's std, "
        "default 0.05), vote on the conclusion, mask chosen by agreement (mean IoU), never by GT.",
        "",
        *table(results),
        "",
        "Dice-Org / Dice-Abn / Diag. F1 / Det. F1: paper 001's hierarchy (Dice only when the diagnosis is right); "
        "gIoU / cIoU: every GT mask of GT-positive 3-step and Ref-Seg samples; ReasonSeg: implicit instructions "
        "(accuracy = the answer resolved them to the right target). Latency: median seconds per 3-step sample "
        "(encoders + generation + masks). FT is the control for FT+RVLS2M and FT+CoT: same data, steps and seed.",
    ]
    for name, entry in results.items():
        a = entry.get("tts_agreement")
        if a:
            body.append(f"- {name}: answers unanimous on {a['unanimous']:.0%} of samples (mean share {a['answer_share']:.2f}), "
                        f"mean mask consensus IoU {fmt(a['mask_iou'])}, mean uncertainty {a['uncertainty']:.3f}.")
    text = "\n".join(body)
    print(text)
    if str(args.results) != "-":
        write_results(args.results, text, SECTION + (f" ({args.title})" if args.title else ""))
        print(f"updated {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
