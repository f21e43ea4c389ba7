"""RadDiagSeg-M demo preset speed on this machine: one generate on a 512×512 slice, and a training step.

Usage: .venv/bin/python benchmarks/model_speed.py [--model CKPT_DIR] [--threads N] [--batch 8] [--repeats 5]
Prints medians; compares fp32 with bf16 autocast for the training step (both measured in this run).
Targets (issue 2): generate ≤ 1 s per slice (~40 tokens + 2 masks), training step batch 8 ≈ 0.2–0.5 s on 2 cores.
"""

import argparse
import statistics
import time

import torch

import repo_paths  # noqa: F401  (puts tests/helpers on sys.path)
from model_helpers import phantom_sample


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a random demo model)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from raddiagseg import build_model, load_model

    torch.manual_seed(0)
    model = load_model(args.model) if args.model else build_model("demo")
    model.eval()
    sample = phantom_sample("liver", size=512)
    print(f"threads {torch.get_num_threads()}, model {'random demo' if not args.model else args.model}")

    # inference: 40 new tokens (a random model never stops early) + the decoder on 2 seg prompts
    res = model.generate(sample["image"], sample["question"], max_new_tokens=40)
    t_gen = median_time(lambda: model.generate(sample["image"], sample["question"], max_new_tokens=40), args.repeats)
    feats = model.encode_images([sample["image"]])
    hidden = torch.randn(2, model.config.language.hidden_size)
    with torch.inference_mode():
        t_dec = median_time(lambda: model.mask_decoder(feats.vision, hidden, torch.zeros(2, dtype=torch.long)), args.repeats)
    print(f"generate 512x512, {len(res.token_ids)} tokens: {t_gen:.3f} s (+ mask decoder for 2 masks {t_dec:.3f} s)")
    print("  stages of the last call: " + ", ".join(f"{k} {v:.3f}" for k, v in res.latencies.items()))
    t_cached = median_time(lambda: model.generate(None, sample["question"], features=feats, max_new_tokens=40), args.repeats)
    print(f"  same slice with cached features: {t_cached:.3f} s")

    # training step
    model.train()
    batch = model.processor.collate([phantom_sample(["liver", "pancreas"][i % 2], size=256, seed=i) for i in range(args.batch)])
    optimiser = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(batch)
        out["loss"].backward()
        optimiser.step()
        optimiser.zero_grad()

    fp32 = median_time(lambda: step(False), args.repeats)
    bf16 = median_time(lambda: step(True), args.repeats)
    print(f"training step batch {args.batch}: fp32 {fp32:.3f} s, bf16 autocast {bf16:.3f} s (ratio bf16/fp32 {bf16 / fp32:.2f})")


if __name__ == "__main__":
    main()
