"""Infer task `raddiagseg`: answer a question about a 2D image, one slice, or a whole volume, and segment.

Subclasses MONAI Label's raw `InferTask` (not `BasicInferTask`): the label names differ per
answer, and this task merges its own defaults into the request. Bad input becomes HTTP 400
with a message; the model is loaded on the first request, not when the app starts.
"""

import logging
import tempfile
import time

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from raddiagseg.imaging import to_unit_range

from lib import image_io, infer_params, label_files, response
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

    def info(self):
        info = super().info()
        info["model_dir"] = str(self.store.current_dir())
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
        start = time.perf_counter()
        params = infer_params.parse({**self.config(), **{k: v for k, v in request.items() if v is not None}})
        image_path = request.get("image")
        if not isinstance(image_path, str):
            raise InputError("image must be a datastore image id or an uploaded file")

        image, array = self.images.read(image_path)
        is_volume = image.GetDimension() == 3
        extension = image_io.label_extension(params.result_extension, is_volume)
        modality = params.modality or image_io.infer_modality(image, array)
        t_read = time.perf_counter()

        def unit(slice2d):
            return to_unit_range(slice2d.astype("float32"), modality, params.window)

        if is_volume:
            view = image_io.VolumeView.of(image)
            volume = view.to_view(array)
            n_slices = volume.shape[0]
            if params.slice is not None and params.slice >= n_slices:
                raise InputError(f"slice {params.slice} is outside the volume: it has {n_slices} slices (0..{n_slices - 1})")
            file_indices = [params.slice] if params.slice is not None else list(range(n_slices))
            view_indices = [view.view_index(k, n_slices) for k in file_indices]
            inputs = [unit(volume[i]) for i in view_indices]
            view_shape, to_file = volume.shape, view.from_view
        else:
            if params.slice not in (None, 0):
                raise InputError("slice only applies to 3D volumes; this image is 2D")
            file_indices, view_indices = [None], [None]
            inputs = [unit(array)]
            view_shape, to_file = array.shape, lambda a: a
        t_pre = time.perf_counter()

        results, run_stats = self.runner.answer(
            inputs,
            [params.model_question()] * len(inputs),
            params.generation_options(),
            batch_size=params.batch_size,
            show_progress=len(inputs) > 1,
            tts=params.tts_options(),
        )
        t_model = time.perf_counter()

        slice_entries, named_per_slice = [], []
        for file_index, view_index, result in zip(file_indices, view_indices, results):
            entry, named = response.slice_summary(result, file_index)
            slice_entries.append(entry)
            named_per_slice.append((view_index, named))
        segments, masks = response.collect_segments(named_per_slice, view_shape, to_file)

        whole_volume = is_volume and params.slice is None
        if whole_volume:
            volume_summary = response.volume_summary(slice_entries)
            detection, diagnosis = volume_summary["detection"], volume_summary["diagnosis"]
            answer = response.volume_answer(detection, diagnosis, [s["name"] for s in segments])
        else:
            volume_summary = None
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
            "modality": modality,
            "segments": segments,
            "label_names": {s["name"]: s["label_value"] for s in segments},
            "slices": slice_entries if is_volume else [],
            "volume": volume_summary,
            "agreement": (results[0].agreement or None) if not whole_volume else None,
            "reasoning": slice_entries[0].get("reasoning") if not whole_volume else None,
            "model": {"version": run_stats["version"], "dir": str(self.store.current_dir())},
            "feature_cache": {**run_stats["counts"], **self.runner.cache.stats()},
            "image_cache": self.images.stats(),
            "latencies": {
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
            },
        }
        logger.info("raddiagseg: %s slice(s), answer %r, %.2fs", len(inputs), answer[:80], t_write - start)
        return output, result_json
