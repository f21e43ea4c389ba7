"""Bounded LRU cache of decoded images, so a second question about the same file skips reading it.

A clinician asks several questions about one study; decoding its file (a gzipped 512x512x200 CT volume:
0.5 s on 2 cores) would otherwise be repeated on every click. An entry is keyed by the file's path,
size, inode and modification time, so a replaced or edited file is read again; DICOM series folders
are always read (their files could change one by one). Entries of files that no longer exist
(deleted uploads) are dropped whenever a new one is added. Cached arrays are read-only: callers copy.
"""

import os
import threading

from cachetools import LRUCache

from lib import image_io


def _file_key(path):
    """(path, size, inode, mtime) of a regular file, or None when it is not one (folder, missing)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    return os.path.realpath(path), info.st_size, info.st_ino, info.st_mtime_ns


class ImageCache:
    def __init__(self, max_bytes=512 * 2**20):
        self.max_bytes = max(0, int(max_bytes))
        # key -> (image, array, bytes); cachetools evicts the least recently read when the bytes exceed the limit
        self._items = LRUCache(maxsize=self.max_bytes, getsizeof=lambda entry: entry[2])
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def read(self, path):
        """(SimpleITK image, read-only array) of `path`, as `image_io.read_image` + `image_array` return them."""
        key = _file_key(path) if self.max_bytes else None
        if key is not None:
            with self._lock:
                if key in self._items:
                    self.hits += 1
                    image, array, _ = self._items[key]
                    return image, array
        image = image_io.read_image(path)
        array = image_io.image_array(image)
        array.flags.writeable = False
        with self._lock:
            self.misses += 1
            if key is not None:
                self._put(key, image, array)
        return image, array

    def _put(self, key, image, array):
        size = 2 * array.nbytes  # the array plus the SimpleITK image's own buffer
        if size > self.max_bytes or key in self._items:  # too big, or another request read it meanwhile
            return
        for old in [k for k in self._items if not os.path.exists(k[0])]:
            del self._items[old]
        self._items[key] = (image, array, size)

    def clear(self):
        with self._lock:
            self._items.clear()

    def stats(self):
        return {"hits": self.hits, "misses": self.misses, "size": len(self._items), "bytes": self._items.currsize,
                "max_bytes": self.max_bytes}
