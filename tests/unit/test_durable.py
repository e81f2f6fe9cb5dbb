"""Crash-safe writes: a file appears whole or not at all, and a filesystem that cannot fsync a
directory is tolerated while a failing disk is not."""

from __future__ import annotations

import errno
import os

import pytest

from sd3train import durable


def test_a_replaced_file_is_whole_and_no_temporary_is_left(tmp_path):
    descriptor, temporary = durable.temporary_file(tmp_path, "table.jsonl")
    with os.fdopen(descriptor, "w") as stream:
        stream.write("row\n")
        durable.sync(stream)
    durable.replace(temporary, tmp_path / "table.jsonl")
    assert (tmp_path / "table.jsonl").read_text() == "row\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["table.jsonl"]


def test_publish_once_keeps_the_first_writer(tmp_path):
    first, second = tmp_path / ".a.tmp-1", tmp_path / ".a.tmp-2"
    first.write_text("first")
    second.write_text("second")
    assert durable.publish_once(first, tmp_path / "a") and not durable.publish_once(second, tmp_path / "a")
    assert (tmp_path / "a").read_text() == "first"
    assert durable.remove_leftovers(tmp_path, ["a"]) == 2


@pytest.mark.parametrize("code, raised", [(errno.EINVAL, False), (errno.ENOTSUP, False), (errno.EIO, True)])
def test_a_directory_that_cannot_be_fsynced_is_tolerated_but_a_disk_error_is_not(tmp_path, monkeypatch, code, raised):
    def failing_fsync(descriptor):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    if raised:
        with pytest.raises(OSError):
            durable.fsync_dir(tmp_path)
    else:
        durable.fsync_dir(tmp_path)
