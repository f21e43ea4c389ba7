"""Infer task `raddiagseg`: answer a question about a 2D image, one slice, or a whole volume, and segment.

Subclasses MONAI Label's raw `InferTask` (not `BasicInferTask`): the label names differ per
answer, and this task merges its own defaults into the request. Bad input becomes HTTP 400
with a message; the model is loaded on the first request, not when the app starts.
Every slice passes the domain guard (`lib.domain_guard`) before it is decoded, and every answer is kept to what
the vocabulary allows for the image's modality (`raddiagseg.findings.restrict_to_modality`).
"""

import logging
import tempfile
import time

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from raddiagseg import findings
from raddiagseg.model.outputs import GenerationResult

from lib import domain_guard, image_io, infer_params, label_files, response
from lib import segments as segment_specs
from lib.image_cache import ImageCache
from lib.image_io import InputError

logger = logging.getLogger(__name__)


class RadDiagSegInfer(InferTask):
    def __init__(self, store, runner, description="Diagnose and segment: answer a question and segment what it names",
                 images=None):
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=segment_specs.label_names(),
            dimension=3,
            description=description,
            config={k: v for k, v in infer_params.DEFAULTS.items()},
        )
        self.store = store
        self.runner = runner
        self.images = images if images is not None else ImageCache(0)  # decoded files (lib/image_cache.py)
        self.progress = None  # the running (or last) request: {image, started, stage, slices_done, ..., eta_s}
        self.guards = domain_guard.Guards()

    def info(self):
        info = super().info()
        folder = self.store.current_dir()  # named, never as a server path (clients see only its name and version)
        if folder is not None:
            version = self.store.version(folder)
            info["model"] = {**self.guards.get(version, folder).identity(), "version": version}
        return info

    def is_valid(self):
        return self.store.available()

    def get_path(self, validate=True):
        folder = self.store.current_dir()
        weights = folder / "model.safetensors" if folder else None
        return str(weights) if weights is not None and (weights.exists() or not validate) else None

    def __call__(self, request):
        try:
            return self.run(request)
        except InputError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        except FileNotFoundError as error:
            raise HTTPException(status_code=503, detail=str(error)) from None

    # ------------------------------------------------------------------------------------
    def run(self, request):
        """(label file path, response JSON as `lib.infer_response.InferResponse`) for one request, in stages timed
        for `latencies`: read the image and its model view, ask the model (`_answer_slices` or `_answer_volume`),
        combine the answers (a refusal, the whole volume's findings or the one slice's answer), write the label file.
        The stages share the request's image, view, guard and timings, so they stay in this one method."""
        start = time.perf_counter()
        params = infer_params.parse({**self.config(), **{k: v for k, v in request.items() if v is not None}})
        image_path = request.get("image")
        if not isinstance(image_path, str):
            raise InputError("image must be a datastore image id or an uploaded file")

        image, array = self.images.read(image_path)
        is_volume = image.GetDimension() == 3
        read_as = domain_guard.modality_of(image, array, params.modality)
        view = image_io.model_view(image, array, read_as["value"])  # the same array `raddiagseg predict` feeds
        n_slices, modality = view.n_slices, view.modality
        extension = image_io.label_extension(params.result_extension, n_slices > 1)
        _, version = self.store.get()
        guard = self.guards.get(version, self.store.current_dir())
        screen = domain_guard.Screen(guard, read_as, params.force)
        t_read = time.perf_counter()

        def unit(index):
            return view.unit(index, params.window)

        file_indices = requested_slices(params.slice, n_slices, is_volume)  # [] = whole volume
        view_indices = [view.view_index(k) for k in file_indices]
        inputs = [unit(i) for i in view_indices]
        t_pre = time.perf_counter()

        whole_volume = not file_indices
        progress = findings.Progress(n_slices if whole_volume else 1, self._progress_reporter(image_path, request))
        if whole_volume:
            results, run_stats, volume_answer = self._answer_volume(params, image, view, unit, progress, screen)
            checked = sorted(results)  # view indices: the screen's keys
            file_indices = [view.view_index(i) for i in checked]  # the view index mapping is its own inverse
            results = [results[i] for i in checked]
        else:
            results, run_stats = self._answer_slices(params, inputs, file_indices, modality, progress, screen)
            checked = file_indices
        t_model = time.perf_counter()
        verdict = screen.volume_verdict() if whole_volume else screen.verdicts[file_indices[0]]
        identity = guard.identity()
        refused = verdict["in_domain"] is False and not params.force

        slice_entries = sorted((self._slice_entry(result, k, screen.verdicts.get(i))
                                for k, i, result in zip(file_indices, checked, results)),
                               key=lambda e: e.get("slice", 0))
        if refused:  # no diagnosis, no segments: say why
            segments, masks, volume_findings = [], {}, []
            detection, diagnosis, answer = None, None, domain_guard.refusal(verdict, identity)
            volume_summary = volume_answer.summary if whole_volume else None
        elif whole_volume:
            segments = segment_specs.assign(volume_answer.names)
            masks = {name: view.to_file(m) for name, m in volume_answer.masks.items()}
            volume_answer.set_label_values({s["name"]: s["label_value"] for s in segments})
            detection, diagnosis, answer = volume_answer.detection, volume_answer.diagnosis, volume_answer.answer_text()
            volume_summary, volume_findings = volume_answer.summary, volume_answer.findings
        else:
            _, named = response.slice_summary(results[0])
            segments, masks = response.collect_segments([(view_indices[0], named)], view.slices.shape, view.to_file)
            volume_summary, volume_findings = None, []
            detection, diagnosis, answer = slice_entries[0]["detection"], slice_entries[0]["diagnosis"], results[0].answer
        t_post = time.perf_counter()

        output = tempfile.NamedTemporaryFile(suffix=extension, delete=False).name
        label_files.write(output, image, segments, masks)
        t_write = time.perf_counter()

        result_json = {
            "answer": answer,
            "detection": detection,
            "diagnosis": diagnosis,
            "question": params.question,
            "options": {"tts": params.tts_options(), "rvls2m": params.rvls2m, "cot": params.cot},
            "modality": read_as,
            "domain": verdict,
            "segments": segments,
            "label_names": {s["name"]: s["label_value"] for s in segments},
            "slices": slice_entries if is_volume else [],
            "volume": volume_summary,
            "findings": volume_findings,
            "agreement": (results[0].agreement or None) if not whole_volume and results[0] is not None else None,
            "reasoning": slice_entries[0].get("reasoning") if not whole_volume else None,
            "model": {**identity, "version": run_stats["version"]},
            "feature_cache": {**run_stats["counts"], **self.runner.cache.stats()},
            "image_cache": self.images.stats(),
            "latencies": latencies(start, t_read, t_pre, t_model, t_post, t_write, run_stats),
        }
        logger.info("raddiagseg: %s slice(s), answer %r, %.2fs", len(results), answer[:80], t_write - start)
        return output, result_json

    @staticmethod
    def _slice_entry(result, number, verdict):
        """The response's entry for one answered (or refused: result None) slice, with its domain verdict."""
        if result is None or not result.answer:
            entry = {"answer": None, "detection": None, "diagnosis": None, "segments": []}
            entry = entry if number is None else {"slice": int(number), **entry}
        else:
            entry = response.slice_summary(result, number)[0]
        if verdict is not None:
            entry["domain"] = verdict
        return entry

    def _answer_slices(self, params, inputs, file_indices, modality, progress, screen):
        """Answers of a 2D image or one requested slice (None where the domain guard refused it), kept to the
        modality's vocabulary, and the runner's stats."""
        progress.plan(len(inputs), "slices")
        results, run_stats = self.runner.answer(
            inputs, [params.model_question()] * len(inputs), params.generation_options(),
            batch_size=params.batch_size, tts=params.tts_options(), progress=progress.advance,
            screen=screen.for_slices(file_indices),
        )
        return [findings.restrict_to_modality(r, modality)[0] if r is not None else None for r in results], run_stats

    def _answer_volume(self, params, image, view, unit, progress, screen):
        """Slice answers of a whole volume combined into 3D findings (`raddiagseg.findings.answer_volume`); slices
        the domain guard refuses read as unanswered (no detection, no masks)."""
        stats = []

        def ask(indices, question, advance):
            results, run_stats = self.runner.answer(
                [unit(i) for i in indices], [question] * len(indices), params.generation_options(),
                batch_size=params.batch_size, show_progress=len(indices) > 1, tts=params.tts_options(), progress=advance,
                screen=screen.for_slices(indices),
            )
            stats.append(run_stats)
            return [findings.restrict_to_modality(r, view.modality)[0] if r is not None else NOT_ANSWERED for r in results]

        volume, n_slices = view.slices, view.n_slices
        volume_answer, results = findings.answer_volume(
            ask, volume.shape, response.view_to_lps(view.orientation, image, volume.shape), params.model_question(),
            view.modality, slice_numbers=[view.view_index(i) for i in range(n_slices)],
            in_body=findings.body_slices(volume) if view.modality == "ct" else None, skip=params.skip_slices,
            progress=progress,
        )
        return results, merge_stats(stats), volume_answer

    def _progress_reporter(self, image_id, request):
        """Keeps `self.progress` (the running request's state, for job/queue status) and calls a
        `request["on_progress"]` callable given in-process (e.g. by serve.py's model thread)."""
        callback = request.get("on_progress")
        started = time.time()

        def report(state):
            self.progress = {"image": image_id, "started": started, **state}
            if callable(callback):
                callback(dict(self.progress))

        return report


NOT_ANSWERED = GenerationResult(answer="", segments=[], latencies={})  # a slice the domain guard refused


def requested_slices(slice_index, n_slices, is_volume):
    """File slice indices the request asks about: [k] for `slice` k or a one-slice image, [] for a whole volume."""
    if slice_index is not None and slice_index >= n_slices:
        if not is_volume:
            raise InputError("slice only applies to 3D volumes; this image is 2D")
        raise InputError(f"slice {slice_index} is outside the volume: it has {n_slices} slices (0..{n_slices - 1})")
    return [slice_index or 0] if slice_index is not None or n_slices == 1 else []


def latencies(start, t_read, t_pre, t_model, t_post, t_write, run_stats):
    """The response's `latencies` (seconds) from the stage clock readings of `run` and the runner's stats."""
    return {
        "read": round(t_read - start, 4),
        "preprocess": round(t_pre - t_read, 4),
        "encode": round(run_stats["timings"]["encode"], 4),
        "generate": round(run_stats["timings"]["generate"], 4),
        "postprocess": round(t_post - t_model, 4),
        "write": round(t_write - t_post, 4),
        "model_stages": {k: round(v, 4) for k, v in run_stats["model"].items()},
        "pre": round(t_pre - start, 4),
        "infer": round(t_model - t_pre, 4),
        "post": round(t_write - t_model, 4),
        "total": round(t_write - start, 4),
    }


def merge_stats(stats):
    """One run-stats dict (timings, model stages, counts summed; version) from several `ModelRunner.answer` calls."""
    merged = {"timings": {}, "model": {}, "counts": {}, "version": stats[-1]["version"] if stats else None}
    steps = 0.0
    for run in stats:
        for key in ("timings", "model", "counts"):
            for name, value in run[key].items():
                if name != "decode_per_token":
                    merged[key][name] = merged[key].get(name, 0) + value
        if run["model"].get("decode_per_token"):
            steps += run["model"].get("decode", 0.0) / run["model"]["decode_per_token"]
    if steps:
        merged["model"]["decode_per_token"] = merged["model"]["decode"] / steps
    return merged
