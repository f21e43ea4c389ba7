"""raddiagseg.fileio: the one crash-safe file write (atomic_write) and folder swap (replace_folder) of trainer/ and
MONAILabelApp/."""

import os
import stat

import pytest

from raddiagseg.fileio import atomic_write, previous_folder, replace_folder
from raddiagseg.training.checkpoints import resolve_checkpoint


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


def test_replace_folder_swaps_a_complete_folder_in_and_leaves_nothing_else(tmp_path):
    target, new = tmp_path / "model", tmp_path / "model.tmp"
    target.mkdir()
    (target / "config.json").write_text("old")
    (target / "stale.bin").write_text("only in the old folder")
    new.mkdir()
    (new / "config.json").write_text("new")
    assert replace_folder(new, target) == target
    assert sorted(os.listdir(tmp_path)) == ["model"] and os.listdir(target) == ["config.json"]
    assert (target / "config.json").read_text() == "new"
    fresh = tmp_path / "fresh.tmp"  # a target that did not exist yet
    fresh.mkdir()
    replace_folder(fresh, tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path)) == ["fresh", "model"]


def test_a_crash_between_the_two_renames_leaves_the_previous_checkpoint_findable(tmp_path):
    target = tmp_path / "last"
    old = previous_folder(target)
    assert old.parent == tmp_path and old.name.startswith(".")
    old.mkdir()  # what the first rename left: the previous checkpoint moved aside, the new one not yet in place
    (old / "config.json").write_text("{}")
    assert resolve_checkpoint(target) == old
    new = tmp_path / "staged"
    new.mkdir()
    (new / "config.json").write_text("{}")
    replace_folder(new, target)  # the next save cleans up the leftover
    assert resolve_checkpoint(target) == target and not old.exists()
