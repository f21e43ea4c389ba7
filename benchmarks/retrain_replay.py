"""How much replay keeps a retrained model from forgetting: the app's train task on a few corrections of
unseen-seed phantoms at several replay:correction ratios, each candidate scored on held-out phantoms.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrain_replay.py --out /tmp/replay --ratios 0 1 4 --lr 2e-4 5e-4

Per run: the gate's decision (published or not, and why) and the candidate's held-out metrics per modality,
next to the served (shipped demo) model's. Writes OUT/results.json and prints a Markdown table.
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
    args = parser.parse_args()
    out, heldout = retraining.start_run(args)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if "served" not in results:
        results["served"] = retraining.score(retraining.DEMO_MODEL, heldout)
        results_path.write_text(json.dumps(results, indent=1))

    for lr in args.lr:
        for ratio in args.ratios:
            key = f"ratio={ratio:g} lr={lr:g}"
            if key in results:
                continue
            run = out / key.replace(" ", "_")
            shutil.rmtree(run, ignore_errors=True)
            pool = retraining.write_pool(run / "studies", run / "truth", CORRECTION_KINDS, args.seed)
            store = retraining.datastore(run / "studies")
            for study in pool.values():
                retraining.correct(store, study)
            config = retraining.app_config(run / "studies", run / "work", reference_cache=out / "reference")
            started = time.time()
            stats = config.trainer()({"max_steps": args.steps, "replay_ratio": ratio, "lr": lr}, store)
            train_s = time.time() - started
            entry = {"published": stats["published"], "reason": stats["reason"], "task_s": round(train_s, 1),
                     "correction_rows": stats["data"]["correction_rows"], "replay_rows": stats["data"]["replay_rows"],
                     "gate": stats["gate"]["sets"], "heldout": retraining.score(stats["checkpoint"], heldout)}
            results[key] = entry
            results_path.write_text(json.dumps(results, indent=1))
            print(key, "published" if entry["published"] else "refused", entry["heldout"]["score"], f"{train_s:.0f} s",
                  flush=True)
    print(table(results))


def _cell(metrics, modality, key):
    value = metrics.get(modality, {}).get(key)
    return "–" if value is None else f"{value:.3f}"


def table(results):
    columns = [("xray", "dice_org", "X-ray Dice-Org"), ("xray", "dice_abn", "X-ray Dice-Abn"),
               ("xray", "diagnosis_f1", "X-ray diag F1"), ("ct", "detection_f1", "CT det F1"),
               ("ct", "diagnosis_f1", "CT diag F1"), ("ct", "dice_org", "CT Dice-Org"), ("ct", "dice_abn", "CT Dice-Abn"),
               ("ct", "refseg_dice", "CT Ref-Seg")]
    lines = ["| model | rows replay:corr | gate | " + " | ".join(c[2] for c in columns) + " | score | task s |",
             "|---" * (len(columns) + 5) + "|"]
    served = results["served"]["metrics"]
    lines.append("| served (shipped demo) | | | " + " | ".join(_cell(served, m, k) for m, k, _ in columns)
                 + f" | {results['served']['score']:.3f} | |")
    for key, entry in results.items():
        if key == "served":
            continue
        metrics = entry["heldout"]["metrics"]
        lines.append(f"| {key} | {entry['replay_rows']}:{entry['correction_rows']} | "
                     f"{'published' if entry['published'] else 'refused'} | "
                     + " | ".join(_cell(metrics, m, k) for m, k, _ in columns)
                     + f" | {entry['heldout']['score']:.3f} | {entry['task_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
