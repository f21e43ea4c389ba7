"""`raddiagseg score` and `raddiagseg predict`: the RadDiagSeg-D benchmark on the command line.

torch and the model are imported inside `predict` only, so `score` runs without them.
"""

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

PRED_FORMAT = """\
PRED.jsonl, one JSON object per line:
  {"id": ..., "answer": "1. Yes\\n2. Liver tumour\\n3. Segmentation masks:\\n- liver <seg000>\\n- liver tumour <seg001>",
   "masks": {"<seg000>": "masks/ID_seg000.png", "<seg001>": "masks/ID_seg001.png"}}
mask paths relative to PRED's folder, PNG or NIfTI, same size as the GT mask.
With --amputated (models that cannot follow the 3-step format), 3-step samples instead carry
  {"id": ..., "answers": {"detection": "...", "diagnosis": "...", "segmentation": "... liver <seg000> ..."},
   "masks": {...}}
the answers to three separate questions (detection yes/no; diagnosis; diagnosis + segmentation),
the masks belonging to the seg tokens of the "segmentation" answer. Ref-Seg and VQA lines keep "answer".
"""


def register(subparsers):
    score = subparsers.add_parser(
        "score",
        help="score predictions against a manifest (RadDiagSeg-D, Ref-Seg, VQA); no model needed",
        description="Score PRED.jsonl against a manifest: detection F1, diagnosis F1/accuracy (paper 001),\n"
        "Dice-Org/Dice-Abn over true-positive valid predictions, Ref-Seg Dice, gIoU/cIoU (paper 003),\n"
        "VQA F1/recall/accuracy. Writes report.json (per modality + overall), report.md (paper 001\n"
        "Table 3 layout), report.csv (every parse decision per sample), report_dice.png (box plot).",
        epilog=PRED_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("--pred", required=True, type=Path, help="PRED.jsonl written by `predict` or by any model")
    score.add_argument("--data", required=True, type=Path, help="manifest.jsonl with the ground truth")
    score.add_argument("--split", default=None,
                       help="score this manifest split (default: the split(s) the predictions belong to)")
    score.add_argument("--out", type=Path, default=None, help="report JSON (default: report.json next to PRED)")
    score.add_argument("--md", type=Path, default=None, help="markdown table (default: the report path with .md)")
    score.add_argument("--name", default=None, help="model name in the table (default: PRED's folder name)")
    score.add_argument("--table", type=Path, default=None,
                       help="also add this model's row to a comparison table TABLE.md (rows kept in TABLE.json)")
    score.add_argument("--amputated", action="store_true", help="3-step samples were asked as three separate questions (see below)")
    score.add_argument(
        "--strict-diagnosis",
        action="store_true",
        help="paper rule only: the GT diagnosis label must appear in the predicted text "
        "(default also accepts the label's vocabulary synonyms, e.g. 'hepatic tumour' for 'Liver tumour')",
    )
    score.set_defaults(func=run_score)

    volumes = subparsers.add_parser(
        "score-volumes",
        help="whole-volume benchmark: answer MSD-layout volumes as the app does and score the 3D findings",
        description="Answer every volume of the MSD task folders under DATA (Task03_Liver, Task07_Pancreas, as written\n"
        "by `raddiagseg phantoms`) with the 3-step question, combine the slice answers into 3D findings\n"
        "(raddiagseg.findings) and score them against the label files: volume detection / diagnosis F1,\n"
        "lesion recall / precision, 3D Dice of organ and lesions, lesion volume and diameter error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    volumes.add_argument("--model", required=True, type=Path, help="model folder (save_pretrained)")
    volumes.add_argument("--data", required=True, type=Path, help="folder holding Task03_Liver/ and/or Task07_Pancreas/")
    volumes.add_argument("--out", type=Path, default=Path("volume_report.json"), help="report JSON (+ .md next to it)")
    volumes.add_argument("--max-volumes", type=int, default=None, help="score the first N volumes (tasks alternating)")
    volumes.add_argument("--batch-size", type=int, default=8)
    volumes.add_argument("--max-new-tokens", type=int, default=96)
    volumes.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    volumes.add_argument("--compare-skip", action="store_true",
                         help="also answer every slice (no skipping) and report the time saved and changed findings")
    volumes.set_defaults(func=run_score_volumes)

    predict = subparsers.add_parser(
        "predict",
        help="run a model over a manifest and write PRED.jsonl + mask PNGs (batched, resumable)",
        description="Run a checkpoint over the rows of one split and write PRED.jsonl (masks as PNG under\n"
        "masks/ next to it). Re-running with the same --out skips ids already written.",
        epilog=PRED_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json + model.safetensors)")
    predict.add_argument("--data", required=True, type=Path, help="manifest.jsonl")
    predict.add_argument("--out", required=True, type=Path, help="PRED.jsonl to write (appended to when it exists)")
    predict.add_argument("--split", default="test", help="manifest split to predict, or all (default: test)")
    predict.add_argument("--batch-size", type=int, default=8, help="images per model call (default: 8)")
    predict.add_argument("--max-new-tokens", type=int, default=128)
    predict.add_argument("--max-samples", type=int, default=None, help="predict an evenly spread subset of this size")
    predict.add_argument("--tasks", nargs="+", choices=("vqaseg", "refseg", "vqa", "reasonseg"), default=None, help="only these tasks")
    predict.add_argument("--cot", action="store_true", help="ask 3-step samples for chain-of-thought answers (templates.COT_QUESTION)")
    predict.add_argument("--rvls2m", choices=("on", "off"), default=None, help="override the model's RVLS2M setting")
    predict.add_argument("--amputated", action="store_true", help="ask 3-step samples as three separate questions")
    predict.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    predict.add_argument("--quantize", choices=("int8", "int8-all"), default=None,
                         help="weight-only int8 on CPU (needs torchao): the LM and its head, or every Linear (int8-all)")
    predict.add_argument("--compile-decode", action="store_true",
                         help="compile the LM's decode step (torch.compile; seconds to compile, then less CPU per token)")
    predict.set_defaults(func=run_predict)


def _user_errors():
    from raddiagseg.cli import CommandError
    from raddiagseg.data.records import InputFileError  # BenchmarkInputError is one

    return CommandError, InputFileError


def run_score(args):
    from raddiagseg.evaluation import report as reports
    from raddiagseg.data.records import read_manifest
    from raddiagseg.evaluation.predictions import read_predictions
    from raddiagseg.evaluation.scoring import score

    CommandError, BenchmarkInputError = _user_errors()
    try:
        rows = read_manifest(args.data, args.split, base=True)
        predictions = read_predictions(args.pred, {row["id"] for row in rows})
        if args.split is None:  # count missing predictions only in the splits that were predicted
            splits = {row.get("split") for row in rows if row["id"] in predictions}
            rows = [row for row in rows if row.get("split") in splits]
            log.info("scoring split(s) %s", ", ".join(sorted(map(str, splits))))
        report, records = score(rows, predictions, args.pred.parent, synonyms=not args.strict_diagnosis,
                                amputated=args.amputated, progress=True)
    except BenchmarkInputError as exc:
        raise CommandError(str(exc)) from None
    if not records:
        raise CommandError(f"no prediction in {args.pred} matches a scorable row of {args.data}")
    out = args.out or args.pred.parent / "report.json"
    md = args.md or out.with_suffix(".md")
    name = args.name or args.pred.parent.name or args.pred.stem
    written = reports.write_all(report, records, out, md, name)
    if args.table:
        written.append(reports.update_comparison(args.table, name, report))
    overall = report["overall"]
    if overall["n_missing"]:
        log.warning("%d manifest rows have no prediction and were not scored", overall["n_missing"])
    unreadable = sum(r.get("unreadable_masks", 0) for r in records)
    if unreadable:
        log.warning("%d masks could not be read and were scored as missing; see the notes column of %s",
                    unreadable, out.with_suffix(".csv"))
    print(reports.markdown(report, name).split("\n\n## All metrics")[0])
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run_predict(args):
    from raddiagseg.evaluation.predict import predict

    CommandError, BenchmarkInputError = _user_errors()
    if args.batch_size < 1:
        raise CommandError("--batch-size must be at least 1")
    try:
        written, skipped = predict(args.model, args.data, args.out, split=args.split, batch_size=args.batch_size,
                                   amputated=args.amputated, max_new_tokens=args.max_new_tokens, tasks=args.tasks,
                                   max_samples=args.max_samples, device=args.device, cot=args.cot,
                                   rvls2m=None if args.rvls2m is None else args.rvls2m == "on", quantize=args.quantize,
                                   compile_decode=args.compile_decode)
    except BenchmarkInputError as exc:
        raise CommandError(str(exc)) from None
    print(f"wrote {written} predictions to {args.out} ({skipped} already there)")
    return 0


def run_score_volumes(args):
    import json

    import torch

    from raddiagseg.cli import CommandError
    from raddiagseg.evaluation.volumes import list_volumes, markdown, run_benchmark
    from raddiagseg.model import load_model

    if not (args.model / "config.json").is_file():
        raise CommandError(f"{args.model} is not a model folder (no config.json)")
    list_volumes(args.data)  # a wrong --data is said before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(str(args.model)).eval()
    summary, records = run_benchmark(model, args.data, max_volumes=args.max_volumes, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens, compare_skip=args.compare_skip)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "volumes": records}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(summary) + "\n")
    print(markdown(summary))
    return 0
