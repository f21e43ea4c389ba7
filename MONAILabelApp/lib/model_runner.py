"""Running the served model on slices, reusing cached image features and batching whole volumes.

`encode_images` results are cached per slice (see `slice_cache`); only slices not seen
before with this model go through the image encoders. Decoding is batched with
`generate_batch` (one `generate` call for a single slice). A greedy answer is remembered per slice
and question and given back as the draft of a repeat question, so the LM verifies it in one pass
instead of decoding it token by token (same answer; `counts` report the draft tokens kept).
`drafts="recent"` also drafts a slice not asked about before with the last answer to the question
about any slice; `"off"` uses no drafts. With `tts` (True, or a dict of `generate_tts` settings:
num_answers, num_masks, rvls2m) every slice is answered with test-time scaling instead
(`generate_tts`: the majority of a greedy and sampled answers, a consensus mask over perturbed
prompts; `result.agreement` says how much they agreed).
"""

import time

from tqdm import tqdm

from lib.slice_cache import slice_key


DRAFT_MODES = ("slice", "recent", "off")


class ModelRunner:
    def __init__(self, store, cache, drafts="slice"):
        if drafts not in DRAFT_MODES:
            raise ValueError(f"answer_drafts must be one of {', '.join(DRAFT_MODES)}, got {drafts!r}")
        self.store = store
        self.cache = cache
        self.drafts = drafts

    def features(self, model, version, images):
        """Per-image features, from the cache or encoded now; returns (features, cache keys, n_encoded, seconds,
        encoder stage seconds)."""
        keys = [slice_key(version, image) for image in images]
        features = [self.cache.get(key) for key in keys]
        missing = [i for i, f in enumerate(features) if f is None]
        start = time.perf_counter()
        stages = {}
        if missing:
            encoded = model.encode_images([images[i] for i in missing])
            stages = dict(encoded.latencies or {})
            for j, i in enumerate(missing):
                features[i] = encoded[j]
                self.cache.put(keys[i], encoded[j])
        return features, keys, len(missing), time.perf_counter() - start, stages

    def answer(self, images, questions, options, batch_size=8, show_progress=False, tts=False, progress=None, screen=None):
        """GenerationResults for each (image, question) (None where `screen` refused it), and stage timings summed
        over batches. `screen(offset, images, features)` says which images to answer; one whose `needs_features`
        is False refuses them all and is called with features None (they are not encoded).

        `progress(k)` is called after each batch with the number of slices it answered."""
        import torch

        with torch.inference_mode():
            return self._answer(images, questions, options, batch_size, show_progress, tts, progress, screen)

    def _answer(self, images, questions, options, batch_size, show_progress, tts=False, progress=None, screen=None):
        model, version = self.store.get()
        results = []
        timings = {"encode": 0.0, "generate": 0.0}
        counts = {"encoded": 0, "cached": 0, "draft_tokens": 0, "draft_tokens_kept": 0}
        drafting = self.drafts != "off" and not tts and not options.get("do_sample")  # drafts serve greedy decoding only
        any_slice = self.drafts == "recent"
        model_stages, decode_steps = {}, 0
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="slices", unit="batch", disable=not show_progress or len(starts) < 2):
            batch, batch_questions = images[start : start + batch_size], questions[start : start + batch_size]
            if screen is not None and not getattr(screen, "needs_features", True):  # refused as it is: not encoded
                results.extend(None for _ in screen(start, batch, None))
                if progress is not None:
                    progress(len(batch))
                continue
            features, keys, n_encoded, seconds, encoder_stages = self.features(model, version, batch)
            timings["encode"] += seconds
            for stage, stage_seconds in encoder_stages.items():  # preprocess, vision, clip of the slices encoded now
                model_stages[stage] = model_stages.get(stage, 0.0) + float(stage_seconds)
            counts["encoded"] += n_encoded
            counts["cached"] += len(batch) - n_encoded
            keep = list(range(len(batch))) if screen is None else \
                [i for i, ok in enumerate(screen(start, batch, features)) if ok]
            refused = len(batch) - len(keep)
            if refused:
                batch, batch_questions = [batch[i] for i in keep], [batch_questions[i] for i in keep]
                features, keys = [features[i] for i in keep], [keys[i] for i in keep]
            first = len(results)
            if batch:
                timings["generate"] += self._decode(model, batch, batch_questions, features, keys, options, tts,
                                                    drafting, any_slice, results, counts)
            batch_results = results[first:]
            if refused:  # None where the screen refused the image, in the batch's order
                del results[first:]
                answered = dict(zip(keep, batch_results))
                results.extend(answered.get(i) for i in range(len(keep) + refused))
            decode_steps += self._count_stages(batch_results, tts, model_stages)
            if progress is not None:
                progress(len(keep) + refused)
        if decode_steps:
            model_stages["decode_per_token"] = model_stages.get("decode", 0.0) / decode_steps
        return results, {"timings": timings, "model": model_stages, "counts": counts, "version": version}

    def _decode(self, model, batch, batch_questions, features, keys, options, tts, drafting, any_slice, results, counts):
        """Answer one batch (appended to `results`); returns the seconds it took."""
        drafts = [self.cache.draft(key, q, any_slice) for key, q in zip(keys, batch_questions)] if drafting else None
        if drafts is not None and not any(drafts):
            drafts = None
        t0 = time.perf_counter()
        first = len(results)
        if tts:
            settings = tts if isinstance(tts, dict) else {}
            results.extend(
                model.generate_tts(image, question, max_new_tokens=options.get("max_new_tokens", 128), features=f, **settings)
                for image, question, f in zip(batch, batch_questions, features)
            )
        elif len(batch) == 1:
            draft = drafts[0] if drafts else None
            results.append(model.generate(batch[0], batch_questions[0], features=features[0], draft=draft, **options))
        else:
            results.extend(
                model.generate_batch(batch, batch_questions, features=features, drafts=drafts, **options)
            )
        seconds = time.perf_counter() - t0
        if drafting:
            for key, question, result in zip(keys, batch_questions, results[first:]):
                self.cache.put_draft(key, question, result.token_ids)
                counts["draft_tokens"] += result.draft.get("offered", 0)
                counts["draft_tokens_kept"] += result.draft.get("accepted", 0)
        return seconds

    @staticmethod
    def _count_stages(batch_results, tts, model_stages):
        """Add a batch's model stage timings to `model_stages`; returns its decode steps. The results of one
        generate_batch call share its stage timings: counted once per batch (test-time scaling answers slice by
        slice, so there every result has its own)."""
        steps = 0
        for result in batch_results if tts else batch_results[:1]:
            stages = dict(result.latencies or {})
            per_token = stages.pop("decode_per_token", None)
            for stage, seconds in stages.items():
                model_stages[stage] = model_stages.get(stage, 0.0) + float(seconds)
            if per_token:
                steps += round(stages.get("decode", 0.0) / per_token)
        return steps
