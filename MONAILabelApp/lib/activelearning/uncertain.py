"""Active learning strategy `uncertain`: the unlabeled image whose sampled answers and masks disagree most.

For each candidate the served model answers the default question `n_samples` times with
sampling on (image features are encoded once and cached); the score is the mean pairwise
disagreement of (detection, diagnosis) and of the masks named alike (1 - Dice). Scores are
stored in the image info (`raddiag_uncertainty`, with the model version) and reused until a
new model is published. Volumes are scored on three axial slices (25/50/75 %).

With `method="tts"` the score is instead the disagreement that test-time scaling reports
(`result.agreement["uncertainty"]`: 1 - mean of the answer share and the masks' consensus IoU
over m answers x n perturbed prompts, paper 003).

With `balance=True` (`--conf uncertain_balance true`) the pick is the most uncertain image of the modality with the
fewest labelled images so far, among the modalities of the images scored so far (each call scores at most
`max_candidates` new ones): sampling disagreement is higher on X-rays than on CT slices, and the plain ranking
picked only X-rays from a weak model (benchmarks/RESULTS.md, "Active learning").
"""

import itertools
import logging
import time
from collections import Counter

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.strategy import Strategy
from raddiagseg import templates, vocabulary

from lib import image_io, infer_params, response

logger = logging.getLogger(__name__)

INFO_KEY = "raddiag_uncertainty"


def _dice(a, b):
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def disagreement(samples):
    """Mean pairwise disagreement of sampled results of one image: 0 = all agree, 1 = all differ."""
    views = []
    for result in samples:
        summary, named = response.slice_summary(result)
        masks = {}
        for name, mask, _ in named:
            masks[name] = masks[name] | mask if name in masks else mask
        diagnosis = vocabulary.normalise_label(summary["diagnosis"] or "")
        views.append(((summary["detection"], diagnosis), masks))
    pairs = list(itertools.combinations(views, 2))
    if not pairs:
        return 0.0
    scores = []
    for (text_a, masks_a), (text_b, masks_b) in pairs:
        text = 0.0 if text_a == text_b else 1.0
        names = set(masks_a) | set(masks_b)
        mask = (
            np.mean([1.0 - _dice(masks_a[n], masks_b[n]) if n in masks_a and n in masks_b else 1.0 for n in names])
            if names
            else 0.0
        )
        scores.append(0.5 * text + 0.5 * float(mask))
    return float(np.mean(scores))


def scoring_slices(image):
    """The model's inputs for scoring: a 2D or one-slice image itself, a volume's axial slices at 25/50/75 %."""
    return _slices(image_io.model_view(image))


def _slices(view):
    n = view.n_slices
    picks = sorted({int(n * f) for f in (0.25, 0.5, 0.75)})
    return [view.unit(k) for k in picks]


class Uncertain(Strategy):
    def __init__(self, store, runner, n_samples=3, max_candidates=16, max_new_tokens=64, method="sampling", tts_masks=3,
                 balance=False):
        super().__init__("Unlabeled image with the most disagreement between sampled answers and masks")
        self.store = store
        self.runner = runner
        self.n_samples = n_samples
        self.max_candidates = max_candidates
        self.max_new_tokens = max_new_tokens
        if method not in ("sampling", "tts"):
            raise ValueError(f"uncertain method must be 'sampling' or 'tts', got {method!r}")
        self.method, self.tts_masks = method, tts_masks
        self.balance = balance

    def score(self, image_path, max_new_tokens=None):
        return self.score_view(image_io.model_view(image_io.read_image(image_path)), max_new_tokens)

    def score_view(self, view, max_new_tokens=None):
        slices = _slices(view)
        options = {"max_new_tokens": max_new_tokens or self.max_new_tokens, "do_sample": True, "temperature": 1.0}
        per_slice = []
        if self.method == "tts":
            tts = {"num_answers": self.n_samples, "num_masks": self.tts_masks}
            results, _ = self.runner.answer(slices, [templates.DEFAULT_QUESTION] * len(slices), options, tts=tts)
            return float(np.mean([r.agreement["uncertainty"] for r in results]))
        for unit in slices:
            results, _ = self.runner.answer([unit] * self.n_samples, [templates.DEFAULT_QUESTION] * self.n_samples,
                                            options, batch_size=self.n_samples)
            per_slice.append(disagreement(results))
        return float(np.mean(per_slice))

    def __call__(self, request, datastore):
        max_new_tokens = request.get("max_new_tokens")  # None: this strategy's own default
        try:
            if max_new_tokens is not None:
                max_new_tokens = infer_params.PARAMS["max_new_tokens"].read(max_new_tokens)
        except infer_params.InputError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not images:
            return None
        _, version = self.store.get()
        scored = []
        for image_id in images:
            cached = datastore.get_image_info(image_id).get(INFO_KEY) or {}
            if cached.get("model_version") == version and cached.get("modality"):
                scored.append((cached["score"], image_id, cached["modality"]))
        fresh = [i for i in images if i not in {s[1] for s in scored}][: self.max_candidates]
        for image_id in fresh:
            try:
                view = image_io.model_view(image_io.read_image(datastore.get_image_uri(image_id)))
                value = self.score_view(view, max_new_tokens)
            except image_io.InputError as error:
                logger.warning("uncertain: cannot score %s: %s", image_id, error)
                continue
            datastore.update_image_info(image_id, {INFO_KEY: {"score": value, "model_version": version,
                                                              "modality": view.modality, "ts": int(time.time())}})
            scored.append((value, image_id, view.modality))
        if not scored:
            return None
        scored.sort(key=lambda s: s[1])  # ties: the first id
        if self.balance:
            scored = self._least_labelled_modality(scored, datastore, request)
        best_score, best, modality = max(scored, key=lambda s: s[0])
        logger.info("uncertain: selected %s (%s, score %.3f of %d scored)", best, modality, best_score, len(scored))
        return {"id": best, "score": best_score}

    def _least_labelled_modality(self, scored, datastore, request):
        """The scored candidates of the modality with the fewest labelled images (ties: the higher best score)."""
        counts = Counter()
        for image_id in datastore.get_labeled_images(request.get("label_tag"), request.get("labels")):
            info = datastore.get_image_info(image_id).get(INFO_KEY) or {}
            modality = info.get("modality")
            if modality is None:  # labelled before it was ever scored: read it once, keep it with the image
                try:
                    modality = image_io.model_view(image_io.read_image(datastore.get_image_uri(image_id))).modality
                except image_io.InputError:
                    continue
                datastore.update_image_info(image_id, {INFO_KEY: {**info, "modality": modality}})
            counts[modality] += 1
        best = {}
        for value, _, modality in scored:
            best[modality] = max(best.get(modality, value), value)
        chosen = min(best, key=lambda m: (counts[m], -best[m]))
        return [s for s in scored if s[2] == chosen]
