"""The three user actions as plain functions: diagnose, submit a correction, retrain.

The Slicer module runs each inside a BackgroundJob (the `context` argument) and only does the
node handling itself; the acceptance test calls the same functions against a live server.
"""

import hashlib
import re
import time

from .labelinfo import build_label_info
from .labelmap import present_label_values
from .segments import empty_segments, segment_specs
from .training import training_progress
from .volume_progress import QueueWatcher


class DiagnosisResult:
    """An answer with its segments: `specs` ordered by label value, `empty` = specs without voxels."""

    def __init__(self, image_id, params, specs, label_path, present, slice_index):
        self.image_id = image_id
        self.params = params
        self.specs = specs
        self.label_path = label_path
        self.present = present
        self.empty = empty_segments(specs, present)
        self.slice_index = slice_index

    @property
    def answer(self):
        return self.params.get("answer", "")

    @property
    def detection(self):
        return self.params.get("detection")

    @property
    def diagnosis(self):
        return self.params.get("diagnosis")


def image_id_for(name, path):
    """Datastore id for a volume: its readable name plus a content hash, safe as a file name.

    Same content → same id, so an image is uploaded once; different volumes that share a node
    name do not overwrite each other on the server.
    """
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name or "image").strip("_")[:48] or "image"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{safe}_{digest.hexdigest()[:12]}"


def _noop(fraction=None, message=""):
    return None


def diagnose(client, model, image_path, image_id, question, slice_index=None, context=None,
             result_dir=None, options=None):
    """Upload the image if the datastore lacks it, ask the question, read the segments back."""
    progress = context.progress if context else _noop
    progress(0.05, "Checking the image on the server…")
    image_id = client.ensure_image(image_path, image_id)
    progress(0.25, "Asking the model…" if slice_index is not None else "Asking the model about every slice…")
    params = {"question": question}
    if slice_index is not None:
        params["slice"] = int(slice_index)
    params.update(options or {})
    if slice_index is None and context is not None:  # minutes on a CPU server: show the slices done and the ETA
        with QueueWatcher(client, image_id, progress):
            result = client.infer(model, image_id=image_id, params=params, result_dir=result_dir)
    else:
        result = client.infer(model, image_id=image_id, params=params, result_dir=result_dir)
    if context:
        context.check()
    progress(0.85, "Reading the segments…")
    specs = segment_specs(result.params)
    present = present_label_values(result.label_path, specs) if result.label_path else set()
    progress(1.0, "Done")
    return DiagnosisResult(image_id, result.params, specs, result.label_path, present, slice_index)


def submit_correction(client, image_id, label_path, specs, detection, diagnosis=None, answer=None,
                      question=None, slice_index=None, model=None, context=None):
    """Save a corrected label map (exported in export_order(specs)) with its label info."""
    progress = context.progress if context else _noop
    info = build_label_info(specs, detection, diagnosis, answer=answer, slice_index=slice_index, model=model,
                            **({"question": question} if question else {}))
    progress(0.3, "Uploading the correction…")
    response = client.save_label(image_id, label_path, info)
    progress(1.0, "Correction saved")
    return info, response


def retrain(client, model, context=None, poll_s=2.0, params=None, timeout_s=None):
    """Start training and follow it to the end; returns the final TrainingProgress."""
    progress = context.progress if context else _noop
    started = client.start_training(model, params=params) or {}
    task_id = started.get("id") if isinstance(started, dict) else None
    start = time.monotonic()
    while True:
        if context:
            context.wait(poll_s)
        else:
            time.sleep(poll_s)
        task = client.training_status()
        if task_id and task and task.get("id") != task_id:
            task = {"status": "PENDING"}  # the status endpoint still shows an older task
        stats = client.train_stats(model)
        state = training_progress(task, stats)
        progress(state.fraction, state.message)
        if state.finished:
            return state
        if timeout_s and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"training did not finish within {timeout_s} s; last: {state.message}")
