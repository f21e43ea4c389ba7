"""Bounded LRU cache of what was computed about a slice, so a second question about it skips work.

Per slice it keeps the image features (a repeat question skips the encoders) and the last greedy
answers given about it, by question (a repeat question passes its earlier answer to the model as a
draft, which greedy decoding verifies in one pass instead of ~25 steps; see `RadDiagSegModel.generate_batch`).
It also keeps the last answer to each question about any slice, a draft for a slice not asked about yet
(neighbouring slices mostly get the same answer).
The key is a digest of the exact model input (the [0, 1] slice after windowing, which covers
image content, slice choice and preprocessing) plus the model version, so a new model or a
different window never reuses stale features or answers.
The infer response reports its counters as `feature_cache` (a documented response key that clients and
benchmarks read).
"""

import hashlib
import threading
from dataclasses import dataclass, field

import numpy as np
from cachetools import LRUCache

DRAFTS_PER_SLICE = 8  # questions remembered per slice
RECENT_QUESTIONS = 32  # questions whose last answer on any slice is remembered


def slice_key(model_version, unit_image):
    array = np.ascontiguousarray(unit_image, dtype=np.float32)
    digest = hashlib.blake2b(array.tobytes(), digest_size=16)
    digest.update(repr(array.shape).encode())
    return f"{model_version}:{digest.hexdigest()}"


def _version(key):
    return key.rsplit(":", 1)[0]


@dataclass
class _Slice:
    features: object
    drafts: LRUCache = field(default_factory=lambda: LRUCache(maxsize=DRAFTS_PER_SLICE))  # question -> token ids


class SliceCache:
    def __init__(self, max_items=64):
        self.max_items = max(0, int(max_items))
        self._items = LRUCache(maxsize=self.max_items)  # key -> _Slice: a slice's drafts go with its features
        self._recent = LRUCache(maxsize=RECENT_QUESTIONS)  # (model version, question) -> last answer's ids, any slice
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        with self._lock:
            if key in self._items:
                self.hits += 1
                return self._items[key].features
            self.misses += 1
            return None

    def put(self, key, features):
        if not self.max_items:
            return
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self._items[key] = _Slice(features)
            else:  # same slice encoded again: keep its drafts
                entry.features = features

    def draft(self, key, question, any_slice=False):
        """Token ids of the last greedy answer to `question` about the slice `key`; with `any_slice`, else the
        last answer to it about any slice with the same model version; or None."""
        with self._lock:
            entry = self._items.get(key)
            same = entry.drafts.get(question) if entry is not None else None
            if same is not None or not any_slice:
                return same
            return self._recent.get((_version(key), question))

    def put_draft(self, key, question, token_ids):
        """Remember an answer about a slice: as its own draft while the slice is cached, and as the last answer to
        the question (kept only when the cache is on)."""
        if not self.max_items:
            return
        with self._lock:
            self._recent[(_version(key), question)] = list(token_ids)
            entry = self._items.get(key)
            if entry is not None:
                entry.drafts[question] = list(token_ids)

    def clear(self):
        with self._lock:
            self._items.clear()
            self._recent.clear()

    def __len__(self):
        return len(self._items)

    def stats(self):
        return {"hits": self.hits, "misses": self.misses, "size": len(self._items), "max_items": self.max_items}
