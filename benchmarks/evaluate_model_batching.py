"""How much batching speeds up `evaluate_model` (predict + score in memory) on CPU or GPU.

Builds a small RadDiagSeg-D from phantoms, makes a randomly initialised demo model, and times
evaluate_model on the same samples with batch size 1 and with --batch-size. Prints samples/s and
the ratio measured in this run (answers of a random model are long, so the decode dominates).

    .venv/bin/python benchmarks/evaluate_model_batching.py --samples 16 --batch-size 8
"""

import argparse
import tempfile
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a random demo model)")
    args = parser.parse_args()

    import torch

    from raddiagseg import build_model, load_model
    from raddiagseg.cli import main as cli
    from raddiagseg.evaluation import evaluate_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cli(["phantoms", "--out", str(tmp / "src"), "--ct-volumes", "4", "--xrays", "12", "--ct-size", "128",
             "--ct-slices", "12", "--xray-size", "128"])
        cli(["build", "--out", str(tmp / "ds"), "--msd", str(tmp / "src/Task03_Liver"), str(tmp / "src/Task07_Pancreas"),
             "--covidqu", str(tmp / "src/COVID-QU-Ex")])
        torch.manual_seed(0)
        model = load_model(args.model) if args.model else build_model("demo")
        manifest = tmp / "ds" / "manifest.jsonl"
        evaluate_model(model, manifest, split="train", tasks=["vqaseg"], max_samples=2, batch_size=2,
                       max_new_tokens=args.max_new_tokens)  # warm-up: one-time initialisation is not timed
        timings = {}
        for batch in (1, args.batch_size):
            start = time.perf_counter()
            report = evaluate_model(model, manifest, split="train", tasks=["vqaseg"], max_samples=args.samples,
                                    batch_size=batch, max_new_tokens=args.max_new_tokens)
            timings[batch] = time.perf_counter() - start
            n = report["overall"]["n"]
            print(f"batch size {batch:3d}: {n} samples in {timings[batch]:.1f} s = {n / timings[batch]:.2f} samples/s")
        print(f"speed-up of batch size {args.batch_size} over 1: {timings[1] / timings[args.batch_size]:.2f}x "
              f"(device {next(model.parameters()).device})")


if __name__ == "__main__":
    main()
