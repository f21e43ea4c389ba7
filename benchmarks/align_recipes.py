"""Issue 4: compare CLIP-alignment recipes (stage 0 of the demo model) by their caption accuracy on unseen volumes.

Stage 0 is where the demo model learns to see lesions: a linear probe read pancreas tumours from the aligned
projector tokens far better than anything later (RESULTS.md, "Demo-model recipes"). A full demo build takes
40 minutes on 2 cores; this runs only the alignment of each recipe, one after another on the same training
phantoms, and prints its validation caption accuracy per caption, so a recipe can be chosen in minutes.

Usage:
  .venv/bin/python benchmarks/align_recipes.py --data WORK/data-train [--steps 1000] [--out results.json] \
      [--augmentation basic|scanner] [--also-val WORK/data-train-mixed] \
      [--recipe NAME='clip.depth=4 projector.num_queries=64'] ...
Without --recipe it runs RECIPES below. --data is a `raddiagseg build` folder (e.g. a demo work folder's data-train).
"""

import argparse
import json
import time
from pathlib import Path


RECIPES = {
    "base": "",
    "clip-depth-4": "clip.depth=4",
}


def run(name, options, args):
    import torch

    from raddiagseg import build_model
    from raddiagseg.training.clip_align import align_clip_encoder
    from raddiagseg.training.commands import parse_model_options

    overrides = parse_model_options(options.split())
    torch.manual_seed(args.seed)
    model = build_model("demo", **overrides)
    start = time.perf_counter()
    summary = align_clip_encoder(model, args.data, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                 progress=not args.quiet, augmentation=args.augmentation,
                                 also_val={Path(m).name: m for m in args.also_val}
                                 | {_set_name(m): (m, None) for m in args.also_all})
    summary.update(recipe=name, overrides=overrides, seconds=time.perf_counter() - start)
    return summary


def _set_name(folder):
    """'.../seed31337/x_ray_gamma_2/built' -> 'seed31337/x_ray_gamma_2' (what the table's column says)."""
    parts = Path(folder).parts
    return "/".join(parts[-3:-1]) if parts[-1] == "built" else parts[-1]


def table(results):
    captions = sorted({c for r in results for c in r["val_acc_per_caption"]})
    others = sorted({k for r in results for k in r if k.startswith("val_acc_") and not k.startswith("val_acc_per")})
    lines = ["| recipe | steps | time | val acc | " + " | ".join(o.replace("_", " ") for o in others)
             + (" | " if others else "") + " | ".join(captions) + " |",
             "|---" * (4 + len(others) + len(captions)) + "|"]
    for r in results:
        cells = [f"{r.get(o, float('nan')):.3f}" for o in others]
        cells += [f"{r['val_acc_per_caption'].get(c, float('nan')):.2f}" for c in captions]
        lines.append(f"| {r['recipe']} | {r['steps']} | {r['seconds'] / 60:.1f} min | {r['val_acc']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a `raddiagseg build` folder with train and val VQA-Seg images")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=OPTIONS",
                        help="demo-config fields as `raddiagseg demo --model-option` takes them, space separated, "
                             "e.g. d4='clip.depth=4 projector.num_queries=64'")
    parser.add_argument("--augmentation", default="basic", choices=("basic", "scanner", "acquisition"),
                        help="training augmentation of every recipe (clip_align.AUGMENT_RANGES)")
    parser.add_argument("--also-val", action="append", default=[], metavar="DATA",
                        help="also score the caption accuracy on this build folder's val split (e.g. scanner phantoms)")
    parser.add_argument("--also-all", action="append", default=[], metavar="DATA",
                        help="also score the caption accuracy on every split of this build folder (e.g. the built "
                             "shifts of benchmarks/robustness.py: WORK/seed31337/*/built)")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not (Path(args.data) / "manifest.jsonl").is_file():
        parser.error(f"--data {args.data} has no manifest.jsonl; point it at a `raddiagseg build` output folder")
    for flag, others in (("--also-val", args.also_val), ("--also-all", args.also_all)):  # checked before any run
        for other in others:
            if not (Path(other) / "manifest.jsonl").is_file():
                parser.error(f"{flag} {other} has no manifest.jsonl; point it at a `raddiagseg build` output folder")
    from raddiagseg.training.commands import CommandError, parse_model_options

    recipes = dict(RECIPES)
    if args.recipe:
        recipes = dict(item.partition("=")[::2] for item in args.recipe)
    for name, options in recipes.items():
        try:
            parse_model_options(options.split())  # every recipe checked before the first one runs
        except CommandError as error:
            parser.error(f"--recipe {name}: {error}")
    results = []
    for name, overrides in recipes.items():
        results.append(run(name, overrides, args))
        print(f"[align] {name}: val acc {results[-1]['val_acc']:.3f} in {results[-1]['seconds']:.0f} s", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
