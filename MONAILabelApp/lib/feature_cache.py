"""Bounded LRU cache of what was computed about a slice, so a second question about it skips work.

Per slice it keeps the image features (a repeat question skips the encoders) and the last greedy
answers given about it, by question (a repeat question passes its earlier answer to the model as a
draft, which greedy decoding verifies in one pass instead of ~25 steps; see `RadDiagSegModel.generate_batch`).
It also keeps the last answer to each question about any slice, a draft for a slice not asked about yet
(neighbouring slices mostly get the same answer).
The key is a digest of the exact model input (the [0, 1] slice after windowing, which covers
image content, slice choice and preprocessing) plus the model version, so a new model or a
different window never reuses stale features or answers.
"""

import hashlib
import threading
from collections import OrderedDict

import numpy as np

DRAFTS_PER_SLICE = 8  # questions remembered per slice
RECENT_QUESTIONS = 32  # questions whose last answer on any slice is remembered


def feature_key(model_version, unit_image):
    array = np.ascontiguousarray(unit_image, dtype=np.float32)
    digest = hashlib.blake2b(array.tobytes(), digest_size=16)
    digest.update(repr(array.shape).encode())
    return f"{model_version}:{digest.hexdigest()}"


def _version(key):
    return key.rsplit(":", 1)[0]


class FeatureCache:
    def __init__(self, max_items=64):
        self.max_items = max(0, int(max_items))
        self._items = OrderedDict()  # key -> features
        self._drafts = {}  # key -> OrderedDict(question -> answer token ids), dropped with the features
        self._recent = OrderedDict()  # (model version, question) -> the last answer's token ids, any slice
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key, features):
        if not self.max_items:
            return
        with self._lock:
            self._items[key] = features
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                old, _ = self._items.popitem(last=False)
                self._drafts.pop(old, None)

    def draft(self, key, question, any_slice=False):
        """Token ids of the last greedy answer to `question` about the slice `key`; with `any_slice`, else the
        last answer to it about any slice with the same model version; or None."""
        with self._lock:
            same = self._drafts.get(key, {}).get(question)
            if same is not None or not any_slice:
                return same
            return self._recent.get((_version(key), question))

    def put_draft(self, key, question, token_ids):
        """Remember an answer about a slice: as its own draft while the slice is cached, and as the last answer to
        the question (kept only when the cache is on)."""
        if not self.max_items:
            return
        with self._lock:
            recent = (_version(key), question)
            self._recent[recent] = list(token_ids)
            self._recent.move_to_end(recent)
            while len(self._recent) > RECENT_QUESTIONS:
                self._recent.popitem(last=False)
            if key not in self._items:
                return
            answers = self._drafts.setdefault(key, OrderedDict())
            answers[question] = list(token_ids)
            answers.move_to_end(question)
            while len(answers) > DRAFTS_PER_SLICE:
                answers.popitem(last=False)

    def clear(self):
        with self._lock:
            self._items.clear()
            self._drafts.clear()
            self._recent.clear()

    def __len__(self):
        return len(self._items)

    def stats(self):
        return {"hits": self.hits, "misses": self.misses, "size": len(self._items), "max_items": self.max_items}
