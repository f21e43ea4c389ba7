"""Issue 22: a model under ordinary scanner variation, on held-out phantoms of unseen seeds.

Per seed: held-out MSD + COVID-QU-Ex phantoms, each shift of `raddiagseg.evaluation.robustness.SHIFTS`
applied to the source files (masks moved with the same geometry), `raddiagseg build`, then the 3-step
rows scored as `raddiagseg predict` + `score` score them; plus generator-version-2 phantoms
(`--variation scanner`) of the same seeds. Prints the table and, with --results, writes it as the
section SECTION of benchmarks/RESULTS.md (replacing an earlier run of this script) and, with --card, as the
model card's section CARD_SECTION (MODEL_DIR/MODEL_CARD.md: the shipped card carries its own robustness table).

Usage:
  .venv/bin/python benchmarks/robustness.py --model MONAILabelApp/model/raddiagseg-demo --work /tmp/robust \
      [--seeds 31337 27182 16180] [--ct-volumes 6] [--xrays 36] [--threads 1] [--results] [--card]
The default seeds are none of the shipped model's (training 1234, held-out 98765 and 55555).
"""

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

from repo_paths import ROOT, write_section

SECTION = "## Robustness to scanner variation (issue 22)"
CARD_SECTION = "## Robustness to scanner variation"
SEEDS = (31337, 27182, 16180)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "MONAILabelApp/model/raddiagseg-demo"))
    p.add_argument("--work", required=True, help="folder for the phantoms and built shifts (reused if present)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--ct-volumes", type=int, default=6, help="held-out CT volumes per seed")
    p.add_argument("--xrays", type=int, default=36, help="held-out X-rays per seed")
    p.add_argument("--ct-slices", type=int, default=12)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-scanner", action="store_true", help="skip the generator-version-2 row")
    p.add_argument("--results", nargs="?", const=str(ROOT / "benchmarks/RESULTS.md"), default=None,
                   help="write the table as a section of this file (default benchmarks/RESULTS.md)")
    p.add_argument("--card", action="store_true", help="write the tables into the model's MODEL_CARD.md too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from raddiagseg.evaluation.robustness import markdown, per_seed_markdown, robustness_table

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    table = robustness_table(args.model, args.work, args.seeds, ct_volumes=args.ct_volumes, xrays=args.xrays,
                             ct_slices=args.ct_slices, scanner=not args.no_scanner)
    wall = time.perf_counter() - start
    Path(args.work, "robustness.json").write_text(json.dumps(table, indent=1, default=str))
    text = markdown(table)
    print(text)
    print(f"{wall / 60:.1f} min")
    if args.results:
        command = "benchmarks/robustness.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        write_section(args.results, SECTION, f"""{SECTION}

`.venv/bin/python {command}` ({wall / 60:.1f} min, {platform.machine()} CPU, torch threads {args.threads}, shared box).
Model `{Path(args.model).name}`; held-out phantoms of seeds {', '.join(map(str, args.seeds))} ({args.ct_volumes} CT volumes of
{args.ct_slices} slices and {args.xrays} X-rays per seed), 3-step rows of all splits, scored per sample as
`raddiagseg score` does and pooled over the seeds. Each shift rewrites the source files before `raddiagseg build`
(masks moved with the image); `–`: the shift does not touch that modality. Bold: below the issue's targets under a
shift (detection F1 ≥ 0.90, diagnosis F1 ≥ 0.85). The last row is generator-version-2 phantoms
(`raddiagseg phantoms --variation scanner`) of the same seeds, unshifted.

{text}
Unshifted, per seed:

{per_seed_markdown(table)}""")
    if args.card:
        command = "benchmarks/robustness.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        write_section(Path(args.model) / "MODEL_CARD.md", CARD_SECTION, f"""{CARD_SECTION}

Measured by `{command}` ({wall / 60:.1f} min): held-out phantoms of the unseen seeds {', '.join(map(str, args.seeds))}
({args.ct_volumes} CT volumes of {args.ct_slices} slices and {args.xrays} X-rays each; generator version 1 unless the row
says otherwise), each shift applied to the source files before `raddiagseg build`, 3-step rows scored as
`raddiagseg score` does. Bold: below detection F1 0.90 / diagnosis F1 0.85 under a shift.

{text}
Clean (unshifted), per unseen seed:

{per_seed_markdown(table)}
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
