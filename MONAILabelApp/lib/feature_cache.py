"""Bounded LRU cache of image features, so a second question about the same slice skips the encoders.

The key is a digest of the exact model input (the [0, 1] slice after windowing, which covers
image content, slice choice and preprocessing) plus the model version, so a new model or a
different window never reuses stale features.
"""

import hashlib
import threading
from collections import OrderedDict

import numpy as np


def feature_key(model_version, unit_image):
    array = np.ascontiguousarray(unit_image, dtype=np.float32)
    digest = hashlib.blake2b(array.tobytes(), digest_size=16)
    digest.update(repr(array.shape).encode())
    return f"{model_version}:{digest.hexdigest()}"


class FeatureCache:
    def __init__(self, max_items=64):
        self.max_items = max(0, int(max_items))
        self._items = OrderedDict()
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
                self._items.popitem(last=False)

    def clear(self):
        with self._lock:
            self._items.clear()

    def __len__(self):
        return len(self._items)

    def stats(self):
        return {"hits": self.hits, "misses": self.misses, "size": len(self._items), "max_items": self.max_items}
