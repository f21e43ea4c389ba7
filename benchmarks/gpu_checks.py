#!/usr/bin/env python
"""The paper preset on an NVIDIA GPU: cold and warm answer, whole-volume throughput, a training step -> RESULTS.md.

    bash benchmarks/gpu_checks.sh OUTDIR            # on the GPU machine: wheels from .whl/, a time limit, OUTDIR/RESULTS.md
    python3 benchmarks/gpu_checks.py --results benchmarks/RESULTS.md [--budget 480]

Untrained paper preset (MedSAM ViT-B 1024 + BiomedCLIP ViT-B/16 + Gemma-2 2.6 B, 2.9 B parameters), built on the
GPU directly in bf16 (random weights, nothing downloaded):

- answer: `benchmarks/latency.py`'s floor on 512x512 CT phantom slices, the app's default 3-step question, a
  scripted 3-step answer with two seg tokens (the LM and its head run every step; random weights never stop by
  themselves): cold = encode_images + generate, warm = generate on the cached features with the cold answer as
  its draft; medians of --repeats;
- whole volume: the app's `ModelRunner` on a --slices x 512 x 512 CT phantom, --batch-size slices per
  encoder and LM call, greedy (random weights: every slice decodes --max-new-tokens tokens) -> slices/s;
- training step: `raddiagseg train`'s loop (paper finetune stage: LoRA + projector + mask decoder + seg rows
  train; frozen weights bf16, trainable fp32, bf16 autocast) on 3-step CT phantom samples -> s/step, samples/s.

Peak GPU memory is reported per phase. Each phase is skipped, and says so, once --budget seconds are spent, so
the script ends inside the 10 minutes a GPU lease allows. Without a CUDA GPU it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from repo_paths import ROOT, write_section

HEADING = "## Paper preset on a GPU (issue 25, `benchmarks/gpu_checks.sh`)"


def no_gpu_reason():
    """None when torch sees a CUDA GPU, else the one line to print."""
    try:
        import torch
    except ImportError:
        return "gpu_checks: torch is not installed here: nothing measured"
    if not torch.cuda.is_available():
        return "gpu_checks: no CUDA GPU here (torch.cuda.is_available() is False): nothing measured"
    return None


class Budget:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()


def gpu_memory_gb(torch):
    """Peak GPU memory since the last call (0 on CPU, the --device cpu dry run)."""
    if not torch.cuda.is_available():
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 1024**3
    torch.cuda.reset_peak_memory_stats()
    return peak


def sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def answer_phase(model, units, repeats, torch):
    """Cold and warm answers of latency.py's floor -> dict."""
    from latency import FORCED_ANSWER, Floor
    from raddiagseg import templates

    force_ids = model.processor.answer_ids(templates.vqaseg_answer(*FORCED_ANSWER))
    floor = Floor(model, templates.DEFAULT_QUESTION, {"max_new_tokens": len(force_ids)}, force_ids, "slice")
    floor.once(units[-1], record=False)  # warm-up (kernels, allocator)
    for unit in units[:repeats]:
        floor.once(unit)
    last = floor.results[-1]
    del model.language_model.logits  # the scripted head was set on the instance: back to the real one
    return {"cold_s": statistics.median(floor.cold), "warm_s": statistics.median(floor.warm), "tokens": len(force_ids),
            "masks": len(last.segments), "decode_per_token_s": last.latencies.get("decode_per_token", 0.0),
            "stages": {k: v for k, v in last.latencies.items() if isinstance(v, float)}, "peak_gb": gpu_memory_gb(torch)}


def volume_phase(model, slices, batch_size, max_new_tokens, torch):
    """The app's whole-volume path (ModelRunner, feature cache off) -> slices/s."""
    from lib.model_runner import ModelRunner
    from lib.slice_cache import SliceCache
    from raddiagseg import templates
    from raddiagseg.data import phantoms
    from raddiagseg.imaging import to_unit_range

    class Store:  # what ModelRunner needs of the app's ModelStore
        def get(self):
            return model, "gpu-checks"

    ct = phantoms.generate_ct(np.random.default_rng(1), "liver", size=512, slices=slices, tumours=2)
    units = [to_unit_range(ct.hu[k].astype(np.float32), "ct", None) for k in range(slices)]
    questions = [templates.DEFAULT_QUESTION] * slices
    runner = ModelRunner(Store(), SliceCache(0))
    options = {"max_new_tokens": max_new_tokens}
    runner.answer(units[:batch_size], questions[:batch_size], options, batch_size=batch_size)  # warm-up
    sync(torch)
    t0 = time.perf_counter()
    results, _ = runner.answer(units, questions, options, batch_size=batch_size)
    sync(torch)
    seconds = time.perf_counter() - t0
    return {"slices": slices, "batch_size": batch_size, "seconds": seconds, "slices_per_s": slices / seconds,
            "tokens": sum(len(r.token_ids) for r in results), "peak_gb": gpu_memory_gb(torch)}


def phantom_samples(n):
    """n 3-step training samples (512 px CT slices with liver and tumour masks) built in memory: no files, so no
    image reader (SimpleITK) is needed on the GPU machine."""
    from raddiagseg import templates
    from raddiagseg.data import phantoms
    from raddiagseg.imaging import to_unit_range

    ct = phantoms.generate_ct(np.random.default_rng(2), "liver", size=512, slices=max(n, 4) + 4, tumours=2)
    samples = []
    for k in range(2, 2 + n):
        organ, tumour = (ct.label[k] >= 1).astype(np.uint8), (ct.label[k] == 2).astype(np.uint8)
        labels = ["liver", "liver tumour"] if tumour.any() else ["liver"]
        answer = templates.vqaseg_answer(bool(tumour.any()), "Liver tumour" if tumour.any() else None, labels)
        samples.append({"id": f"ct{k}", "task": "vqaseg", "modality": "ct", "question": templates.DEFAULT_QUESTION,
                        "image": to_unit_range(ct.hu[k].astype(np.float32), "ct", None), "answer": answer,
                        "masks": [organ, tumour][: len(labels)]})
    return samples


def train_phase(model, work: Path, steps, batch_size, device, torch):
    """`raddiagseg train`'s loop on the built model and in-memory phantom samples -> s/step (median after the first)."""
    from paper_train_step import step_seconds
    from raddiagseg.training import TrainConfig, train

    samples = phantom_samples(2 * batch_size)
    (work / "manifest.jsonl").touch()  # the config names a manifest; the samples are given directly
    config = TrainConfig(data=str(work), out=str(work / "run"), stage="finetune", preset="paper", max_steps=steps,
                         batch_size=batch_size, grad_accum=1, lr=1e-4, warmup=1, val_every=10 * steps,
                         save_every=10 * steps, device=device, frozen_dtype="bfloat16", precision="auto",
                         progress_bar=False)
    timings = []

    def progress(info):  # called after each optimizer step
        sync(torch)
        timings.append(time.perf_counter())

    train(config, model=model, progress=progress, dataset=samples, collate=model.processor.collate,
          epoch_order=lambda epoch: [int(i) for i in np.random.default_rng(epoch).permutation(len(samples))],
          evaluate=lambda m: None)
    seconds, losses = step_seconds(work / "run")
    per_step = [b - a for a, b in zip(timings, timings[1:])]
    later = statistics.median(per_step) if per_step else seconds[0]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"steps": steps, "batch_size": batch_size, "s_per_step": later, "samples_per_s": batch_size / later,
            "first_step_s": seconds[0], "losses": losses, "trainable": trainable, "peak_gb": gpu_memory_gb(torch)}


def results_text(device_name, built, phases, skipped, device="cuda"):
    lines = [HEADING, "",
             f"**{device_name}**, `benchmarks/gpu_checks.py`: untrained paper preset ({built['params'] / 1e6:,.1f} M "
             f"parameters, bf16, built on {'the GPU' if device == 'cuda' else device} in {built['seconds']:.0f} s, "
             f"{built['gb']:.1f} GB of weights).", ""]
    if "answer" in phases:
        a = phases["answer"]
        lines.append(f"- Answer (512x512 CT slice, scripted 3-step answer of {a['tokens']} tokens, {a['masks']} masks): "
                     f"cold {a['cold_s']:.2f} s, warm {a['warm_s']:.2f} s (warm/cold {a['warm_s'] / a['cold_s']:.2f}), "
                     f"{a['decode_per_token_s'] * 1000:.1f} ms per decoded token, peak GPU memory {a['peak_gb']:.1f} GB; "
                     "cold stages [ms]: " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in a["stages"].items()))
    if "volume" in phases:
        v = phases["volume"]
        lines.append(f"- Whole volume ({v['slices']} slices of 512x512, batches of {v['batch_size']}, the app's ModelRunner, "
                     f"{v['tokens'] / v['slices']:.0f} tokens per slice): {v['seconds']:.1f} s, {v['slices_per_s']:.1f} "
                     f"slices/s, peak GPU memory {v['peak_gb']:.1f} GB")
    if "train" in phases:
        t = phases["train"]
        lines.append(f"- Training step (finetune stage, batch {t['batch_size']}, {t['trainable'] / 1e6:.1f} M trainable, "
                     f"bf16 frozen weights + autocast): {t['s_per_step']:.2f} s/step ({t['samples_per_s']:.1f} samples/s; "
                     f"first step {t['first_step_s']:.1f} s), peak GPU memory {t['peak_gb']:.1f} GB")
    for name, reason in skipped.items():
        lines.append(f"- {name}: not measured ({reason})")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="RESULTS.md to write into")
    p.add_argument("--budget", type=float, default=480, help="seconds after which the remaining phases are skipped")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="slices per call in the whole-volume phase")
    p.add_argument("--max-new-tokens", type=int, default=24, help="whole-volume phase")
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--device", default="cuda", help="cuda; cpu is a dry run of the script's code (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny paper-shaped model (paper_train_step.py's), for the dry run")
    args = p.parse_args()
    reason = no_gpu_reason() if args.device == "cuda" else None
    if reason:
        print(reason)
        return 0
    import torch

    from latency import build_random
    from paper_train_step import TINY
    from raddiagseg.training.commands import parse_model_options

    budget = Budget(args.budget)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(args.device):
        model = build_random("paper", torch.bfloat16, **parse_model_options(TINY if args.tiny else [], "paper"))
    sync(torch)
    params = sum(p.numel() for p in model.parameters())
    built = {"seconds": time.perf_counter() - t0, "params": params, "gb": params * 2 / 1024**3}
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"dry run on {args.device}"
    print(f"{name}: paper preset built in {built['seconds']:.1f} s ({built['params'] / 1e9:.2f} B parameters)", flush=True)
    from raddiagseg.data import phantoms
    from raddiagseg.imaging import to_unit_range

    ct = phantoms.generate_ct(np.random.default_rng(0), "liver", size=512, slices=args.repeats + 6, tumours=2)
    units = [to_unit_range(ct.hu[i + 2].astype(np.float32), "ct", None) for i in range(args.repeats + 2)]
    phases, skipped = {}, {}
    plan = [("answer", 60, lambda: answer_phase(model, units, args.repeats, torch)),
            ("volume", 90, lambda: volume_phase(model, args.slices, args.batch_size, args.max_new_tokens, torch))]
    with tempfile.TemporaryDirectory(prefix="raddiag-gpu-") as tmp:
        plan.append(("train", 120, lambda: train_phase(model, Path(tmp), args.train_steps, args.train_batch, args.device, torch)))
        for phase, needs, run in plan:
            if budget.left() < needs:
                skipped[phase] = f"{budget.left():.0f} s of the {args.budget:.0f} s budget left, it needs about {needs} s"
                continue
            gpu_memory_gb(torch)
            try:
                phases[phase] = run()
            except (Exception, SystemExit) as exc:  # one failing phase must not lose the others' numbers
                skipped[phase] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"{phase}: {phases.get(phase) or skipped[phase]}", flush=True)
    text = results_text(name, built, phases, skipped, args.device)
    print("\n" + text)
    write_section(args.results, HEADING, text)
    return 0 if phases else 1


if __name__ == "__main__":
    sys.exit(main())
