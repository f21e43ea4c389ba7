"""How much replay keeps a retrained model from forgetting, and whether what the gate publishes is safe: the app's
train task on a few corrections of unseen-seed phantoms at several replay:correction ratios and learning rates, each
candidate scored on held-out phantoms.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrain_replay.py --out /tmp/replay --ratios 0 1 4 --lr 2e-4 5e-4

Per run: the gate's decision (published or not, at which blend weight, and why), the held-out metrics per modality of
the candidate it ended with (the published one, or the last checked) and, when blends were tried, of the fine-tuned
model too, next to the served model's; the largest held-out drop of the candidate against the served model, and the
score on the corrected cases (the gate's, served → candidate). Writes OUT/results.json and prints a Markdown table.
"""

import argparse
import json
import shutil
import time

import retraining

# The corrections: unseen-seed phantoms of each kind (the forgetting case had 4 corrected images).
CORRECTION_KINDS = ["liver", "pancreas", "COVID-19", "Non-COVID"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    retraining.add_run_arguments(parser, "/tmp/raddiag-replay", 60, "phantom seed of the corrections", 4, 24)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 1.0, 4.0])
    parser.add_argument("--lr", type=float, nargs="+", default=[2e-4])
    parser.add_argument("--blend-tries", type=int, help="the train task's blend_tries (1: no blends; default: the task's)")
    parser.add_argument("--corrections", nargs="+", default=CORRECTION_KINDS,
                        help="kinds of the corrected studies, one study each (liver, pancreas, COVID-19, Non-COVID, Normal)")
    args = parser.parse_args()
    out, heldout = retraining.start_run(args)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if "served" not in results:
        results["served"] = retraining.score(args.model, heldout)
        results_path.write_text(json.dumps(results, indent=1))

    for lr in args.lr:
        for ratio in args.ratios:
            key = f"ratio={ratio:g} lr={lr:g} steps={args.steps} corrections={len(args.corrections)}"
            if key in results:
                continue
            run = out / key.replace(" ", "_")
            shutil.rmtree(run, ignore_errors=True)
            pool = retraining.write_pool(run / "studies", run / "truth", args.corrections, args.seed, variation=args.variation)
            store = retraining.datastore(run / "studies")
            for study in pool.values():
                retraining.correct(store, study)
            config = retraining.app_config(run / "studies", run / "work", model_path=args.model,
                                           reference_cache=out / "reference")
            started = time.time()
            request = {"max_steps": args.steps, "replay_ratio": ratio, "lr": lr}
            if args.blend_tries:
                request["blend_tries"] = args.blend_tries
            stats = config.trainer()(request, store)
            train_s = time.time() - started
            corrected = stats["gate"]["sets"].get("heldout_corrections") or stats["gate"]["sets"]["corrections"]
            entry = {"published": stats["published"], "reason": stats["reason"], "task_s": round(train_s, 1),
                     "correction_rows": stats["data"]["correction_rows"], "replay_rows": stats["data"]["replay_rows"],
                     "images": stats["data"]["images"], "blend_weight": stats["blend_weight"],
                     "attempts": stats["gate"]["attempts"], "gate": stats["gate"]["sets"],
                     "corrected": [corrected["served"]["score"], corrected["candidate"]["score"]],
                     "heldout": retraining.score(stats["checkpoint"], heldout)}
            if stats["blend_weight"] != 1.0:  # what the blends prevented: the fine-tuned model on the same held-out set
                entry["heldout_tuned"] = retraining.score(stats["gate"]["attempts"][0]["checkpoint"], heldout)
            results[key] = entry
            results_path.write_text(json.dumps(results, indent=1))
            print(key, "published" if entry["published"] else "refused", entry["heldout"]["score"], f"{train_s:.0f} s",
                  flush=True)
    print(table(results))


COLUMNS = [("xray", "dice_org", "X-ray Dice-Org"), ("xray", "dice_abn", "X-ray Dice-Abn"),
           ("xray", "diagnosis_f1", "X-ray diag F1"), ("ct", "detection_f1", "CT det F1"), ("ct", "diagnosis_f1", "CT diag F1"),
           ("ct", "dice_org", "CT Dice-Org"), ("ct", "dice_abn", "CT Dice-Abn"), ("ct", "refseg_dice", "CT Ref-Seg")]


def _row(name, held, served, cells=("", "", "", "")):
    drop, where = retraining.largest_drop(held["metrics"], served["metrics"])
    return (f"| {name} | " + " | ".join(cells) + " | " + " | ".join(retraining.cell(held["metrics"], m, k) for m, k, _ in COLUMNS)
            + f" | {held['score']:.3f} | " + ("" if held is served else f"{drop:+.3f} {where}") + " |")


def table(results):
    lines = ["| model | images, rows replay:corr | gate (blend weight) | corrected cases served → candidate | task s | "
             + " | ".join(c[2] for c in COLUMNS) + " | held-out score | largest held-out drop vs served |",
             "|---" * (len(COLUMNS) + 7) + "|"]
    served = results["served"]
    lines.append(_row("served", served, served))
    for key, entry in results.items():
        if key == "served":
            continue
        weight = entry.get("blend_weight", 1.0)
        decision = ("published" if entry["published"] else "refused") + f" ({weight:g})"
        corrected = "{:.3f} → {:.3f}".format(*entry["corrected"]) if entry.get("corrected") else ""
        cells = (f"{entry.get('images', '')}, {entry['replay_rows']}:{entry['correction_rows']}", decision, corrected,
                 f"{entry['task_s']:.0f}")
        if "heldout_tuned" in entry:
            lines.append(_row(f"{key}, fine-tuned (weight 1)", entry["heldout_tuned"], served,
                              ("", "refused (1)", "", "")))
        lines.append(_row(key, entry["heldout"], served, cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
