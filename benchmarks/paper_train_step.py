#!/usr/bin/env python
"""The paper preset's first training run, rehearsed on random weights in the real file formats.

    nice -n 10 .venv/bin/python benchmarks/paper_train_step.py --work /tmp/paper-step --results   # full size
    nice -n 10 .venv/bin/python benchmarks/paper_train_step.py --work /tmp/paper-step --nproc 1,2  # + torchrun x2
    .venv/bin/python benchmarks/paper_train_step.py --work /tmp/t --tiny                            # seconds (pytest)

1. writes a MedSAM-style `.pth`, an open_clip BiomedCLIP folder and a PaliGemma2 HF folder (sharded bf16
   safetensors + a tokenizer with `<seg000>`...`<seg127>`) with random values under --work (keep it outside
   the repository), and a small phantom dataset (`raddiagseg phantoms` + `raddiagseg build`);
2. runs `raddiagseg train --preset paper --sam-checkpoint ... --clip-dir ... --lm-dir ...` for --steps steps
   (finetune stage: LoRA + projector + mask decoder + seg-token rows train, the rest is frozen; frozen weights
   bf16, trainable fp32 under bf16 autocast), once per --nproc value (2: `torchrun --nproc_per_node 2`, gloo,
   DDP: every rank holds the whole model and LoRA, gradients are all-reduced; the effective batch is the
   one-process batch, its micro-batches shared between the ranks);
3. loads the saved checkpoint (`best/`, bf16) in a fresh process and answers a phantom slice;
4. deletes the weight files and the run's checkpoints (--keep keeps them).

Reported per run: seconds per step (the median of the steps after the first, which also builds the model),
peak RSS of the training process (per rank under torchrun: the largest), trainable parameters, checkpoint
size; with --nproc 1,2 also how far the two runs' losses and trainable weights are apart (dropout and
augmentation off, so they see the same samples; the weights should agree to rounding).
--tiny and --model-option PART.FIELD=VALUE shrink the model (any field of the paper config).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from repo_paths import ROOT, write_section

# a paper-shaped model small enough for a pytest run: every component of the paper preset, few and narrow layers
TINY = [
    "vision.image_size=64", "vision.embed_dim=32", "vision.depth=2", "vision.num_heads=2", "vision.window_size=2",
    "vision.global_attn_indexes=[1]", "vision.out_chans=32",
    "clip.image_size=32", "clip.embed_dim=32", "clip.depth=1", "clip.num_heads=2",
    "projector.num_queries=4", "projector.num_heads=2",
    "language.vocab_size=1536", "language.hidden_size=64", "language.intermediate_size=128",
    "language.num_hidden_layers=2", "language.num_attention_heads=2", "language.num_key_value_heads=1",
    "language.head_dim=32", "language.query_pre_attn_scalar=32", "language.lora_rank=4",
    "mask_decoder.transformer_mlp_dim=64", "mask_decoder.transformer_heads=2", "mask_decoder.iou_head_hidden_dim=32",
]
# same samples in every run: no LoRA dropout, no augmentation, so one and two processes can be compared
DETERMINISTIC = ["language.lora_dropout=0.0"]
LR = 1e-4


def peak_rss_gb(rusage):
    return rusage.ru_maxrss / 1024**2  # Linux: KiB


def run_child(cmd, env, log_path):
    """Run `cmd`, its output to `log_path` -> (exit code, seconds, its peak RSS in GB: the largest of it and the
    descendants it waited for, e.g. torchrun's ranks)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, peak_rss_gb(usage)


def child_env(threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "trainer"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def write_data(folder: Path):
    """A small phantom dataset in the public layouts, built into a manifest (CT 128 px, X-rays 128 px)."""
    from raddiagseg.cli import main

    src, out = folder / "src", folder / "data"
    if (out / "manifest.jsonl").is_file():
        return out
    assert main(["phantoms", "--out", str(src), "--ct-volumes", "2", "--xrays", "6", "--ct-size", "128",
                 "--ct-slices", "8", "--xray-size", "128", "--vqa-images", "2", "--refseg-images", "1",
                 "--workers", "1"]) == 0
    assert main(["build", "--out", str(out), "--msd", str(src / "Task03_Liver"), str(src / "Task07_Pancreas"),
                 "--covidqu", str(src / "COVID-QU-Ex"), "--vqarad", str(src / "VQA_RAD" / "VQA_RAD Dataset Public.json"),
                 "--min-organ-pixels", "20", "--min-tumour-pixels", "5"]) == 0
    return out


def write_weights(folder: Path, config):
    """The three real-format weight sources of `config` (random values) -> {option: path}, with their sizes."""
    from raddiagseg.model import weight_files

    paths = {"sam_checkpoint": folder / "medsam_vit_b.pth", "clip_dir": folder / "BiomedCLIP",
             "lm_dir": folder / "paligemma2-3b-pt-224"}
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted run's files
    t0 = time.perf_counter()
    weight_files.write_sam_checkpoint(paths["sam_checkpoint"], config.vision, config.mask_decoder)
    weight_files.write_open_clip_folder(paths["clip_dir"], config.clip)
    weight_files.write_paligemma_folder(paths["lm_dir"], config.language)
    sizes = {k: weight_files.folder_bytes(p) / 1e9 for k, p in paths.items()}
    print(f"wrote random weights in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{paths[k].name} {v:.2f} GB" for k, v in sizes.items()), flush=True)
    return paths, sizes


def train_command(args, data, weights, out, nproc, options):
    train = ["-m", "raddiagseg", "train", "--data", str(data), "--stage", "finetune", "--preset", "paper",
             "--out", str(out), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--grad-accum", str(args.grad_accum), "--lr", str(LR), "--warmup", "1", "--val-every", str(args.steps),
             "--val-samples", "1", "--save-dtype", "bfloat16", "--frozen-dtype", args.frozen_dtype, "--no-augment",
             "--device", "cpu", "--engine", args.engine]
    for key, path in weights.items():
        train += [f"--{key.replace('_', '-')}", str(path)]
    for option in options:
        train += ["--model-option", option]
    if args.gradient_checkpointing:
        train.append("--gradient-checkpointing")
    if nproc == 1:
        return [sys.executable, *train]
    from live_server import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *train]


def step_seconds(run: Path):
    """Seconds of each optimizer step from metrics.csv's wall clock (the first includes building the model)."""
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    walls = [float(r["wall_s"]) for r in rows]
    return [b - a for a, b in zip([0.0] + walls, walls)], [float(r["loss"]) for r in rows]


def answer_check(checkpoint: Path, out_json: Path):
    """Child process: load the checkpoint in bf16 as a server does, answer one phantom CT slice, count parameters."""
    import numpy as np
    import torch

    from raddiagseg import load_model, templates
    from raddiagseg.data import phantoms
    from raddiagseg.imaging import to_unit_range

    t0 = time.perf_counter()
    model = load_model(checkpoint, dtype=torch.bfloat16)
    loaded = time.perf_counter() - t0
    ct = phantoms.generate_ct(np.random.default_rng(0), "liver", size=256, slices=6, tumours=1)
    unit = to_unit_range(ct.hu[3].astype(np.float32), "ct", None)
    t0 = time.perf_counter()
    result = model.generate(unit, templates.DEFAULT_QUESTION, max_new_tokens=12)
    answer_s = time.perf_counter() - t0
    # a few steps from random weights need not emit a seg token: script one answer (the LM still runs every step)
    # so that the reloaded projector, seg rows and mask decoder are seen to turn seg-token states into masks
    from latency import FORCED_ANSWER, scripted_logits

    scripted_logits(model, model.processor.answer_ids(templates.vqaseg_answer(*FORCED_ANSWER)))
    scripted = model.generate(unit, templates.DEFAULT_QUESTION, max_new_tokens=48)
    counts = model.parameter_counts()
    out_json.write_text(json.dumps({
        "load_s": loaded, "answer_s": answer_s, "answer": result.answer,
        "tokens": len(result.token_ids), "segments": len(result.segments),
        "scripted_segments": {s.label: int(s.mask.sum()) for s in scripted.segments},
        "parameters": {k: {"total": t, "trainable": n} for k, (t, n) in counts.items()},
        "trainable": sum(n for _, n in counts.values()), "total": sum(t for t, _ in counts.values()),
    }))


def trainable_state(checkpoint: Path):
    """{name: tensor} of the trainable parameters saved in a `last/` checkpoint (fp32 master weights)."""
    from safetensors import safe_open

    from raddiagseg import load_model

    names = {n for n, p in load_model(checkpoint).named_parameters() if p.requires_grad}
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys() if k in names}


def one_run(args, data, weights, options, nproc, threads):
    out = args.work / f"run-{nproc}proc"
    shutil.rmtree(out, ignore_errors=True)
    env = child_env(threads)
    cmd = train_command(args, data, weights, out, nproc, options)
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    code, seconds, rss = run_child(cmd, env, args.work / f"train-{nproc}proc.log")
    if code != 0:
        tail = (args.work / f"train-{nproc}proc.log").read_text()[-3000:]
        raise SystemExit(f"training with {nproc} process(es) failed (exit {code}):\n{tail}")
    steps, losses = step_seconds(out)
    later = sorted(steps[1:]) or steps
    check = args.work / f"answer-{nproc}proc.json"
    code, _, answer_rss = run_child([sys.executable, __file__, "--answer-check", str(out / "best"), str(check)], env,
                                    args.work / f"answer-{nproc}proc.log")
    if code != 0:
        raise SystemExit(f"loading {out / 'best'} and answering failed:\n{(args.work / f'answer-{nproc}proc.log').read_text()[-3000:]}")
    answer = json.loads(check.read_text())
    from raddiagseg.model.weight_files import folder_bytes

    report = {
        "nproc": nproc, "threads_per_process": threads, "wall_s": seconds, "step_s": steps, "losses": losses,
        "s_per_step": later[len(later) // 2], "peak_rss_gb": rss, "answer_peak_rss_gb": answer_rss,
        "checkpoint_gb": folder_bytes(out / "best") / 1e9, "answer": answer,
        "effective_batch": args.batch_size * args.grad_accum, "run": str(out),
    }
    print(f"{nproc} process(es): {report['s_per_step']:.2f} s/step (steps {', '.join(f'{s:.1f}' for s in steps)} s), "
          f"peak RSS {rss:.2f} GB, {answer['trainable'] / 1e6:.2f} M of {answer['total'] / 1e6:.1f} M parameters "
          f"trainable, best/ {report['checkpoint_gb']:.2f} GB; reloaded in {answer['load_s']:.1f} s and answered "
          f"{answer['tokens']} tokens in {answer['answer_s']:.1f} s (peak RSS {answer_rss:.2f} GB); scripted answer's masks "
          f"(pixels): {answer['scripted_segments']}", flush=True)
    return report


def compare(runs, steps):
    """How far the one- and two-process runs are apart: losses per step, trainable weights after the last step
    (against the most AdamW can move a weight in those steps, about lr per step)."""
    one, two = runs
    a, b = trainable_state(Path(one["run"]) / "last"), trainable_state(Path(two["run"]) / "last")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    losses = max(abs(x - y) for x, y in zip(one["losses"], two["losses"]))
    return {"loss_max_abs_diff": losses, "weights_max_abs_diff": diff, "adam_max_move": LR * steps,
            "same_keys": sorted(a) == sorted(b), "trainable_tensors": len(a)}


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--answer-check":
        return answer_check(Path(sys.argv[2]), Path(sys.argv[3]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for weights, data and runs (outside the repository)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch of one process")
    p.add_argument("--grad-accum", type=int, default=2, help="effective batch = batch size x grad accum, any --nproc")
    p.add_argument("--nproc", default="1", help="process counts to run, e.g. 1 or 1,2 (2: torchrun, gloo)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (shared by the processes of a run)")
    p.add_argument("--frozen-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--engine", default="ddp", choices=("ddp", "deepspeed"),
                   help="deepspeed: ZeRO-2 (needs the deepspeed package; on CPU it uses gloo)")
    p.add_argument("--tiny", action="store_true", help="a tiny paper-shaped model (seconds; the pytest check)")
    p.add_argument("--model-option", action="append", default=[], metavar="PART.FIELD=VALUE")
    p.add_argument("--keep", action="store_true", help="keep the weight files and checkpoints")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--results", action="store_true", help="write the report into benchmarks/RESULTS.md")
    args = p.parse_args()
    if ROOT in args.work.resolve().parents:
        raise SystemExit(f"--work {args.work} is inside the repository: the weight files are gigabytes, put them elsewhere")
    from raddiagseg.model.config import preset_config
    from raddiagseg.training.commands import parse_model_options

    options = (TINY if args.tiny else []) + DETERMINISTIC + args.model_option
    config = preset_config("paper", **parse_model_options(options, "paper"))
    args.work.mkdir(parents=True, exist_ok=True)
    nprocs = [int(n) for n in args.nproc.split(",")]
    report = {"model_options": options, "steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
              "frozen_dtype": args.frozen_dtype, "gradient_checkpointing": args.gradient_checkpointing,
              "engine": args.engine, "runs": []}
    try:
        data = write_data(args.work)
        weights, sizes = write_weights(args.work / "weights", config)
        report["weight_files_gb"] = sizes
        for nproc in nprocs:
            report["runs"].append(one_run(args, data, weights, options, nproc, max(1, args.threads // nproc)))
        if len(nprocs) == 2:
            report["ddp_vs_one_process"] = compare(report["runs"], args.steps)
            c = report["ddp_vs_one_process"]
            print(f"\n{nprocs[0]} vs {nprocs[1]} processes, same effective batch {args.batch_size * args.grad_accum}: losses "
                  f"differ by at most {c['loss_max_abs_diff']:.2e}, trainable weights by at most "
                  f"{c['weights_max_abs_diff']:.2e} ({c['trainable_tensors']} tensors; AdamW moves a weight by up to "
                  f"{c['adam_max_move']:.0e} in {args.steps} steps)")
    finally:
        if not args.keep:
            shutil.rmtree(args.work / "weights", ignore_errors=True)
            for run in args.work.glob("run-*proc"):
                for folder in ("best", "last"):
                    shutil.rmtree(run / folder, ignore_errors=True)
    report["deleted"] = not args.keep
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.results:
        write_section(ROOT / "benchmarks" / "RESULTS.md", "## Paper preset: a training step at size (issue 25)",
                      results_text(report))
    return 0


def results_text(report):
    from latency import machine

    lines = ["## Paper preset: a training step at size (issue 25)", "",
             f"`benchmarks/paper_train_step.py` ({machine()}): random weights written in the real formats, "
             f"`raddiagseg train --preset paper` finetune stage, {report['steps']} steps, effective batch "
             f"{report['batch_size'] * report['grad_accum']}, frozen weights {report['frozen_dtype']}, gradient "
             f"checkpointing {'on' if report['gradient_checkpointing'] else 'off'}, engine "
             f"{'DeepSpeed ZeRO-2' if report.get('engine') == 'deepspeed' else 'DDP'}; model options "
             f"{' '.join(report['model_options']) or 'none (full size)'}.", "",
             "| processes | s/step | peak RSS (GB, per process) | trainable / total params | best/ (GB) | reload + answer "
             "| answer tokens | scripted answer's masks (pixels) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        a = r["answer"]
        lines.append(f"| {r['nproc']} | {r['s_per_step']:.2f} | {r['peak_rss_gb']:.2f} | {a['trainable'] / 1e6:.2f} M / "
                     f"{a['total'] / 1e6:.1f} M | {r['checkpoint_gb']:.2f} | {a['load_s']:.1f} s + {a['answer_s']:.1f} s | "
                     f"{a['tokens']} | {', '.join(f'{k}: {v}' for k, v in a.get('scripted_segments', {}).items()) or '-'} |")
    if "ddp_vs_one_process" in report:
        c = report["ddp_vs_one_process"]
        engine = "DeepSpeed ZeRO-2 (optimizer state and gradients split over the ranks)" if report.get(
            "engine") == "deepspeed" else "DDP (replicated LoRA)"
        lines += ["", f"{engine}, two processes vs one: losses within {c['loss_max_abs_diff']:.1e}, trainable "
                      f"weights within {c['weights_max_abs_diff']:.1e} after the last step."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
