"""The app's cache of decoded image files: a repeat question on a study skips reading it, but an edited,
replaced or deleted file is never served from memory, and the memory bound holds."""

import os

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")


from lib.image_cache import ImageCache
from lib.image_io import InputError


def write_volume(path, value, shape=(8, 32, 32), spacing=(0.8, 0.8, 2.5)):
    image = sitk.GetImageFromArray(np.full(shape, value, np.int16))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_second_read_is_a_hit_with_the_same_geometry_and_a_read_only_array(tmp_path):
    path = write_volume(tmp_path / "ct.nii.gz", 40)
    cache = ImageCache()
    image, array = cache.read(str(path))
    again_image, again = cache.read(str(path))
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1
    assert again.shape == (8, 32, 32) and int(again[0, 0, 0]) == 40
    assert again_image.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))
    with pytest.raises(ValueError):
        again[0, 0, 0] = 1  # shared between requests: nobody may write into it


def test_a_rewritten_file_is_read_again(tmp_path):
    path = write_volume(tmp_path / "ct.nii.gz", 40)
    cache = ImageCache()
    cache.read(str(path))
    write_volume(path, -100, shape=(6, 32, 32))
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # even within one clock tick
    _, array = cache.read(str(path))
    assert array.shape == (6, 32, 32) and int(array[0, 0, 0]) == -100
    assert cache.stats()["hits"] == 0 and cache.stats()["misses"] == 2


def test_memory_bound_evicts_the_oldest_and_skips_files_larger_than_it(tmp_path):
    one = 2 * 8 * 32 * 32 * 2  # bytes counted per (8, 32, 32) int16 volume: array + SimpleITK buffer
    cache = ImageCache(max_bytes=2 * one)
    a, b, c = (write_volume(tmp_path / f"{n}.nii.gz", i) for i, n in enumerate("abc"))
    for path in (a, b, c):
        cache.read(str(path))
    assert cache.stats()["size"] == 2 and cache.stats()["bytes"] <= 2 * one
    cache.read(str(a))  # evicted: read again
    assert cache.stats()["hits"] == 0
    cache.read(str(c))
    assert cache.stats()["hits"] == 1
    big = write_volume(tmp_path / "big.nii.gz", 1, shape=(40, 32, 32))
    cache.read(str(big))
    assert cache.stats()["bytes"] <= 2 * one


def test_deleted_files_leave_the_cache_and_bad_files_still_fail_clearly(tmp_path):
    cache = ImageCache()
    upload = write_volume(tmp_path / "upload.nii.gz", 5)
    cache.read(str(upload))
    os.remove(upload)
    cache.read(str(write_volume(tmp_path / "next.nii.gz", 6)))
    assert cache.stats()["size"] == 1
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read the image"):
        cache.read(str(broken))
    with pytest.raises(InputError):
        cache.read(str(tmp_path / "missing.nii.gz"))


def test_zero_bytes_disables_the_cache(tmp_path):
    path = write_volume(tmp_path / "ct.nii.gz", 40)
    cache = ImageCache(max_bytes=0)
    cache.read(str(path))
    cache.read(str(path))
    assert cache.stats()["hits"] == 0 and cache.stats()["size"] == 0
