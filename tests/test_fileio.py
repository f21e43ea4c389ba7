"""raddiagseg.fileio.atomic_write: the one crash-safe file write of trainer/ and MONAILabelApp/."""

import os
import stat

import pytest

from raddiagseg.fileio import atomic_write


def test_text_bytes_and_writer_callables_replace_the_file_with_the_mode_asked(tmp_path):
    path = tmp_path / "sub" / "a.json"
    assert atomic_write(path, "{\"x\": 1}\r\n") == path and path.read_bytes() == b"{\"x\": 1}\r\n"  # newlines as given
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    atomic_write(path, b"\x00\x01", mode=0o600)
    assert path.read_bytes() == b"\x00\x01" and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    atomic_write(path, lambda tmp: tmp.write_text("from a writer"))
    assert path.read_text() == "from a writer" and os.listdir(path.parent) == ["a.json"]


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail, prefix=".partial-")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["weights.bin"]
