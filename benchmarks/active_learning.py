"""Does active learning pay: rounds of k corrections chosen by each strategy the app offers, retrained through the
app's own train task (replay and publishing gate as shipped), scored on held-out phantoms after every round.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/active_learning.py --out /tmp/al --rounds 2 --k 2
    (or one process per strategy, side by side: --strategies uncertain; then --strategies with none to tabulate)

Start model: `--model`, by default the shipped demo model (what a new user serves). Pool and held-out set: unseen-seed
phantoms (CT volumes and X-rays); `--variation scanner` draws them with generator version 2 (each study its own
acquisition), where a model trained on version-1 phantoms is weak (RESULTS.md, "Robustness to scanner variation"): the
strategies then have something to find, while the gate still guards the model's own (reference) distribution. Strategies: `uncertain`
(sampling disagreement), `uncertain` with `uncertain_method=tts`, `uncertain` with `uncertain_balance=true` (from the
modality with the fewest corrections), and MONAI Label's `random`, each called through the
app's strategy objects one image at a time, as `POST /activelearning/<strategy>` does; the chosen image's ground truth
is saved as the clinician's final label. Per round: the candidate's held-out metrics (it is what the corrections
bought), the gate's decision, and the served model's held-out score after the gate (the candidate's when published).
Writes OUT/start.json and OUT/<strategy>.json (resumable), prints a Markdown table, plots OUT/active_learning.png.
"""

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import retraining

STRATEGIES = {"uncertain": ("uncertain", {}), "uncertain-tts": ("uncertain", {"uncertain_method": "tts"}),
              "uncertain-balanced": ("uncertain", {"uncertain_balance": "true"}), "random": ("random", {})}
# Unseen-seed pool: 4 CT volumes, 6 X-rays, every kind the app answers.
POOL_KINDS = ["liver", "pancreas", "COVID-19", "Non-COVID", "Normal", "liver", "pancreas", "COVID-19", "Non-COVID",
              "Normal"]


def run_strategy(name, args, out, heldout):
    """[{round, corrections, picks, published, reason, candidate: held-out score, served_score}] of one strategy."""
    strategy_name, conf = STRATEGIES[name]
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    pool = retraining.write_pool(run / "studies", run / "truth", POOL_KINDS, args.seed, variation=args.variation)
    store = retraining.datastore(run / "studies")
    config = retraining.app_config(run / "studies", run / "work", model_path=args.model,
                                   reference_cache=out / "reference", **conf)
    strategy = config.strategies()[strategy_name]
    random.seed(args.seed)  # MONAI Label's Random draws from the `random` module
    rounds, picks, served_score = [], [], None
    for number in range(1, args.rounds + 1):
        started = time.time()
        chosen = []
        for _ in range(args.k):
            selected = strategy({"strategy": strategy_name}, store)
            retraining.correct(store, pool[selected["id"]])
            chosen.append({"id": selected["id"], "score": selected.get("score")})
        select_s = time.time() - started
        picks += [c["id"] for c in chosen]
        started = time.time()
        stats = config.trainer()({"max_steps": args.steps}, store)
        train_s = time.time() - started
        candidate = retraining.score(stats["checkpoint"], heldout)
        if stats["published"]:
            served_score = candidate["score"]
        entry = {"round": number, "corrections": len(picks), "chosen": chosen, "published": stats["published"],
                 "blend_weight": stats.get("blend_weight"),
                 "reason": stats["reason"], "gate": stats["gate"], "candidate": candidate, "served_score": served_score,
                 "select_s": round(select_s, 1), "train_s": round(train_s, 1)}
        rounds.append(entry)
        print(f"{name} round {number}: {[c['id'] for c in chosen]} -> candidate {candidate['score']:.3f}, "
              f"{'published' if stats['published'] else 'refused'} ({select_s:.0f} s select, {train_s:.0f} s train)",
              flush=True)
    return rounds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    retraining.add_run_arguments(parser, "/tmp/raddiag-al", 40, "phantom seed of the pool", 3, 16)
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=list(STRATEGIES),
                        help="run these (one process each can run side by side: each writes OUT/<strategy>.json)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, default=2, help="corrections per round")
    args = parser.parse_args()
    out, heldout = retraining.start_run(args)
    for name in args.strategies:
        path = out / f"{name}.json"
        if not path.is_file():
            path.write_text(json.dumps(run_strategy(name, args, out, heldout), indent=1, default=str))
    start_path = out / "start.json"
    if not start_path.is_file():
        start_path.write_text(json.dumps(retraining.score(args.model, heldout), indent=1))
    results = {"start": json.loads(start_path.read_text())}
    results.update({name: json.loads((out / f"{name}.json").read_text()) for name in STRATEGIES
                    if (out / f"{name}.json").is_file()})
    print(table(results))
    print(plot(results, out / "active_learning.png"))
    print(noise_table(out / "reference" / "served_reports.json", results))


def reference_noise(served_reports, draws=300, seed=0):
    """{modality: {metric: (value, bootstrap std, change from one flipped row)}} of the served model on the gate's
    reference set: how precisely that set measures it, and how far one row whose diagnosis flips moves each metric."""
    from raddiagseg.evaluation.scoring import summarise
    from raddiagseg.training import selection

    report, records = next(v for k, v in json.loads(Path(served_reports).read_text()).items() if k.startswith("records|"))
    rng = np.random.default_rng(seed)
    out = {}
    for modality in sorted({r["modality"] for r in records}):
        rows = [r for r in records if r["modality"] == modality]
        draws_ = [summarise([rows[i] for i in rng.integers(0, len(rows), len(rows))]) for _ in range(draws)]
        vqaseg = [r for r in rows if r["task"] == "vqaseg" and r["c"]]
        flipped = summarise([{**vqaseg[0], "c": 0, "dice": []}, *[r for r in rows if r is not vqaseg[0]]]) if vqaseg else {}
        out[modality] = {key: (report[modality][key], float(np.std([d[key] for d in draws_ if d[key] is not None])),
                               (flipped.get(key) or 0.0) - report[modality][key] if flipped else None)
                         for key in selection.STAGE_METRICS["finetune"] if report[modality].get(key) is not None}
        out[modality]["rows"] = len(rows)
    return out


def noise_table(served_reports, results):
    """Markdown: the served model's reference-set metrics with their noise, and the paired noise the gate measured
    for each candidate (max over the runs)."""
    noise = reference_noise(served_reports)
    paired = {}
    for name, rounds in results.items():
        for entry in rounds if name != "start" else []:
            for modality, values in entry["gate"]["sets"].get("reference", {}).get("bounds", {}).items():
                for key, bound in values.items():
                    paired.setdefault((modality, key), []).append(bound["std"])
    lines = ["| modality (rows) | metric | served | bootstrap std | one diagnosis flipped | paired noise of candidates "
             "(min–max) |", "|---|---|---|---|---|---|"]
    for modality, values in noise.items():
        for key, (value, std, flip) in ((k, v) for k, v in values.items() if k != "rows"):
            spread = paired.get((modality, key))
            lines.append(f"| {modality} ({values['rows']}) | {key} | {value:.3f} | {std:.3f} | "
                         + ("–" if flip is None else f"{flip:+.3f}") + " | "
                         + (f"{min(spread):.3f}–{max(spread):.3f}" if spread else "–") + " |")
    return "\n".join(lines)


COLUMNS = [("xray", "diagnosis_f1", "X-ray diag F1"), ("xray", "dice_abn", "X-ray Dice-Abn"),
           ("ct", "detection_f1", "CT det F1"), ("ct", "diagnosis_f1", "CT diag F1"), ("ct", "dice_org", "CT Dice-Org"),
           ("ct", "dice_abn", "CT Dice-Abn")]


def _fixed_rule(gate):
    """What the app's gate would decide on the same scores if it compared the observed drops with 0.02 (no bound)."""
    from lib import model_store
    from raddiagseg.training import selection

    sets = {name: {**entry, "worse": selection.regressions(entry["served"]["metrics"], entry["candidate"]["metrics"],
                                                           model_store.GATE_TOLERANCE)}
            for name, entry in gate["sets"].items()}
    return "published" if model_store.gate(sets)[0] else "refused"


def _decision(entry):
    """'published' / 'refused', with the blend weight of the published candidate when it was a blend."""
    if not entry["published"]:
        return "refused"
    weight = entry.get("blend_weight")
    return "published" + (f" (blend {weight:g})" if weight not in (None, 1.0) else "")


def table(results):
    lines = ["| strategy | corrections | chosen | candidate score | " + " | ".join(c[2] for c in COLUMNS)
             + " | largest held-out fall vs start | gate (0.02 on the observed drop) | served score after |", "|---" * (len(COLUMNS) + 7) + "|"]
    start = results["start"]
    lines.append(f"| start model | 0 | | {start['score']:.3f} | "
                 + " | ".join(retraining.cell(start["metrics"], m, k) for m, k, _ in COLUMNS) + f" | | | {start['score']:.3f} |")
    for name, rounds in results.items():
        if name == "start":
            continue
        for entry in rounds:
            served = entry["served_score"] if entry["served_score"] is not None else start["score"]
            chosen = ", ".join(c["id"] for c in entry["chosen"])
            drop, where = retraining.largest_drop(entry["candidate"]["metrics"], start["metrics"])
            fixed = _fixed_rule(entry["gate"])
            lines.append(f"| {name} | {entry['corrections']} | {chosen} | {entry['candidate']['score']:.3f} | "
                         + " | ".join(retraining.cell(entry["candidate"]["metrics"], m, k) for m, k, _ in COLUMNS)
                         + f" | {drop:.3f} {where} | {_decision(entry)} ({fixed}) "
                         f"| {served:.3f} |")
    return "\n".join(lines)


def plot(results, path):
    """Held-out selection score of each strategy's candidate against the number of corrections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = results["start"]["score"]
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for name, rounds in results.items():
        if name == "start":
            continue
        xs = [0] + [e["corrections"] for e in rounds]
        axis.plot(xs, [start] + [e["candidate"]["score"] for e in rounds], marker="o", label=name)
        published = [e for e in rounds if e["published"]]
        axis.scatter([e["corrections"] for e in published], [e["candidate"]["score"] for e in published],
                     s=90, facecolors="none", edgecolors="black")
    axis.axhline(start, color="grey", linestyle=":", label="start model")
    axis.set_xlabel("corrections")
    axis.set_ylabel("held-out selection score")
    axis.set_title("Active learning (circled: published by the gate)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
