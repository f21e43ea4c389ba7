"""Running a model over a manifest: `raddiagseg predict` (to a resumable PRED.jsonl) and `evaluate_model` (in memory).

Samples go through the model in batches (`model.encode_images` once per batch, then
`model.generate_batch`); with `amputated`, each 3-step sample is asked the three questions of
`predictions.AMPUTATED_QUESTIONS` on the same cached image features.
"""

import logging
from pathlib import Path

import numpy as np

from raddiagseg import templates
from raddiagseg.evaluation import scoring
from raddiagseg.data.records import read_manifest
from raddiagseg.evaluation.files import BenchmarkInputError
from raddiagseg.evaluation.predictions import AMPUTATED_QUESTIONS, PredictionWriter

log = logging.getLogger(__name__)


def sample_image(row):
    """The model input of a manifest row, read and normalised exactly as in training and in the app
    (`data.dataset.load_image`: `imaging.model_view`)."""
    from raddiagseg.data.dataset import load_image
    from raddiagseg.imaging import InputError

    if not row.get("image"):
        raise BenchmarkInputError(f"manifest row {row['id']!r} has no image")
    try:
        return load_image(row, row["_base"])
    except (FileNotFoundError, InputError) as exc:
        raise BenchmarkInputError(f"manifest row {row['id']!r}: {exc}") from None


def sample_question(row, cot=False):
    """The question a row asks (the manifest's, else the task's template question); cot: 3-step rows ask for reasoning."""
    if cot and row["task"] == "vqaseg":
        return templates.COT_QUESTION
    question = row.get("question")
    if question and question != "<DEFAULT_QUESTION>":
        return question
    if row["task"] == "refseg" and row.get("targets"):
        return templates.refseg_question(row["targets"][0]["name"], row.get("modality") or "ct")
    return templates.DEFAULT_QUESTION


def _masks_of(result):
    return [(segment.token, np.asarray(segment.mask, bool)) for segment in result.segments]


def run_model(model, rows, batch_size=8, amputated=False, max_new_tokens=128, progress=True, cot=False, generate_options=None):
    """Yield (row, prediction) in row order; prediction = {"answer" | "answers", "segments": [(token, mask)]}."""
    from tqdm import tqdm

    bar = tqdm(total=len(rows), desc="predict", unit="sample", disable=not progress)
    try:
        for start in range(0, len(rows), max(1, batch_size)):
            batch = rows[start : start + batch_size]
            images = [sample_image(row) for row in batch]
            outputs = [None] * len(batch)
            three_step = [i for i, row in enumerate(batch) if amputated and row["task"] == "vqaseg"]
            plain = [i for i in range(len(batch)) if i not in three_step]
            if plain:
                sub_images = [images[i] for i in plain]
                features = model.encode_images(sub_images)
                questions = [sample_question(batch[i], cot) for i in plain]
                results = model.generate_batch(sub_images, questions, features=features, max_new_tokens=max_new_tokens,
                                               **(generate_options or {}))
                for i, result in zip(plain, results):
                    outputs[i] = {"answer": result.answer, "segments": _masks_of(result)}
            if three_step:  # the three questions on one encoding of the images
                sub_images = [images[i] for i in three_step]
                features = model.encode_images(sub_images)
                answers = {i: {} for i in three_step}
                for key, question in AMPUTATED_QUESTIONS.items():
                    replies = model.generate_batch(
                        sub_images, [question] * len(three_step), features=features, max_new_tokens=max_new_tokens
                    )
                    for i, reply in zip(three_step, replies):
                        answers[i][key] = reply.answer
                        if key == "segmentation":
                            outputs[i] = {"answers": answers[i], "segments": _masks_of(reply)}
            for row, output in zip(batch, outputs):
                yield row, output
            bar.update(len(batch))
    finally:
        bar.close()


def model_from(model_or_dir, device=None):
    """A loaded model as it is, or the model of a checkpoint folder (BenchmarkInputError if it is not one)."""
    if isinstance(model_or_dir, (str, Path)):
        from raddiagseg import load_model

        path = Path(model_or_dir)
        if not (path / "config.json").is_file():
            raise BenchmarkInputError(f"{path} is not a model checkpoint folder (no config.json)")
        return load_model(path, device=device)
    return model_or_dir


def _select(rows, tasks=None, max_samples=None):
    if tasks:
        rows = [r for r in rows if r["task"] in tasks]
    rows = [r for r in rows if r["task"] in scoring.SCORED_TASKS]
    if max_samples and len(rows) > max_samples:  # evenly spread, so every source and modality is represented
        picks = np.unique(np.linspace(0, len(rows) - 1, max_samples).round().astype(int))
        rows = [rows[i] for i in picks]
    return rows


def predict(model_or_dir, manifest, out, split="test", batch_size=8, amputated=False, max_new_tokens=128,
            tasks=None, max_samples=None, device=None, progress=True, cot=False, rvls2m=None, quantize=None,
            compile_decode=False):
    """Write predictions for the rows of `split` to `out` (PRED.jsonl), skipping ids already there. Returns (written, skipped).
    `quantize`: None, or a `raddiagseg.model.quantize` mode (weight-only int8) applied to a model loaded here;
    `compile_decode`: decode steps compiled (`raddiagseg.model.static_decode`)."""
    rows = _select(read_manifest(manifest, None if split == "all" else split, base=True), tasks, max_samples)
    if not rows:
        raise BenchmarkInputError(f"{manifest} has no rows to predict for split {split!r}")
    if compile_decode and not isinstance(model_or_dir, (str, Path)):  # before anything is loaded, changed or skipped
        raise BenchmarkInputError("compile_decode applies to a model folder; set "
                                  "model.language_model.compile_decode on a model object yourself")
    writer = PredictionWriter(out)
    try:
        mixed = [r["id"] for r in rows if r["task"] == "vqaseg" and r["id"] in writer.done
                 and (r["id"] in writer.amputated_ids) != bool(amputated)]
        if mixed:
            raise BenchmarkInputError(
                f"{out} already holds {'standard' if amputated else 'amputated'} predictions (e.g. {mixed[0]!r}); "
                f"write {'--amputated' if amputated else 'standard'} predictions to another --out"
            )
        todo = [r for r in rows if r["id"] not in writer.done]
        skipped = len(rows) - len(todo)
        if skipped:
            log.info("resuming %s: %d of %d samples already predicted", out, skipped, len(rows))
        if todo:
            model = model_from(model_or_dir, device)
            if quantize:
                from raddiagseg.model.quantize import quantize_model

                quantize_model(model, quantize)
            if compile_decode:  # on a model this call loaded (checked above: not a model passed in)
                model.language_model.compile_decode = True
            model.eval()
            import torch

            with torch.inference_mode():
                for row, output in run_model(model, todo, batch_size, amputated, max_new_tokens, progress, cot,
                                             {"rvls2m": rvls2m} if rvls2m is not None else None):
                    writer.write(row["id"], output["segments"], answer=output.get("answer"), answers=output.get("answers"))
    finally:
        writer.close()
    return len(todo), skipped


def evaluate_model(model_or_dir, manifest, split="val", max_samples=None, batch_size=8, amputated=False,
                   synonyms=True, tasks=None, max_new_tokens=128, device=None, progress=False, return_records=False,
                   cot=False, rvls2m=None):
    """Predict and score in memory; returns a dict shaped like report.json ({modality: metrics, "overall": metrics}).

    Used by the trainer (validation, best checkpoint) and the app (comparing models). `max_samples`
    scores an evenly spread subset for speed. Each sample is scored as soon as it is predicted and
    its masks dropped, so memory stays flat on large splits.
    """
    import torch

    rows = _select(read_manifest(manifest, split, base=True), tasks, max_samples)
    if not rows:
        raise BenchmarkInputError(f"{manifest} has no rows to evaluate for split {split!r}")
    model = model_from(model_or_dir, device)
    was_training = getattr(model, "training", False)
    model.eval()
    records = []
    try:
        with torch.inference_mode():
            for row, output in run_model(model, rows, batch_size, amputated, max_new_tokens, progress, cot,
                                         {"rvls2m": rvls2m} if rvls2m is not None else None):
                prediction = {"id": row["id"], "masks": dict(output["segments"])}
                if "answers" in output:
                    prediction["answers"] = output["answers"]
                else:
                    prediction["answer"] = output["answer"]
                records.append(scoring.score_sample(row, prediction, Path(row["_base"]), synonyms, amputated))
    finally:
        if was_training:
            model.train()
    report = scoring.build_report(records, scoring.run_settings(synonyms=synonyms, amputated=amputated))
    return (report, records) if return_records else report
