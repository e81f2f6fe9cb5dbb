"""Crash-safe writes: a hidden temporary sibling, fsynced, then renamed or linked into place.

    descriptor, temporary = temporary_file(folder, name)   # `.<name>.tmp-XXXXXXXX`, mode as open() gives
    with os.fdopen(descriptor, "wb") as stream: ...; sync(stream)
    replace(temporary, folder / name)      # or publish_once(...): only if nothing is there yet
    temporary.unlink(missing_ok=True)      # in a `finally`, for when the write failed
    remove_leftovers(folder, names)        # what a killed writer left for these names

    staging = temporary_dir(folder, name)    # a whole folder: write into it, fsync_tree(staging), rename it
    write_synced(staging / "MARKER", text)   # a small file written and fsynced in one call

A reader therefore sees a complete file or none, and after a crash the folder holds at most the
hidden temporary files, which `remove_leftovers` finds by `TEMP_MARK`. Files are always fsynced;
directories (what makes a rename durable) only where the filesystem can fsync one.
"""

from __future__ import annotations

import errno
import glob
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO

TEMP_MARK = ".tmp-"
# What a filesystem that cannot open or fsync a directory answers (some network and FUSE
# filesystems); any other error (EIO, ENOSPC) is a failed write and raised.
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR,
                                 errno.EACCES, errno.EPERM})


def with_default_mode(path: Path) -> Path:
    """Give a file or folder made by `tempfile` (0600 / 0700) the mode a plain open or mkdir gives,
    so what is renamed into place is readable by the user's group as their umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)
    return Path(path)


def temporary_file(folder: Path, name: str) -> tuple[int, Path]:
    """A new hidden file next to `name`, with the permissions a plain open() would give it."""
    descriptor, path = tempfile.mkstemp(dir=folder, prefix=f".{name}{TEMP_MARK}")
    return descriptor, with_default_mode(Path(path))


def temporary_dir(folder: Path, name: str) -> Path:
    """A new hidden folder next to `name`, with the permissions a plain mkdir would give it."""
    return with_default_mode(Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}{TEMP_MARK}")))


def sync(stream: IO) -> None:
    """Flush `stream` and fsync its file."""
    stream.flush()
    os.fsync(stream.fileno())


def write_synced(path: Path, text: str) -> None:
    """Write `text` to `path` and fsync it (for a file inside a folder that is renamed into place later)."""
    with open(path, "w") as handle:
        handle.write(text)
        sync(handle)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the filesystem can fsync a directory)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError as error:
        if error.errno in _NO_DIRECTORY_FSYNC:
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in _NO_DIRECTORY_FSYNC:
            raise
    finally:
        os.close(descriptor)


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory as `fsync_dir` does."""
    if Path(path).is_dir():
        fsync_dir(path)
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (or `root` itself if it is a file), deepest first."""
    root = Path(root)
    if not root.is_dir():
        fsync_path(root)
        return
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_dir(Path(directory))


def replace(temporary: Path, path: Path) -> None:
    """Rename the finished `temporary` to `path` (replacing any file there), durably."""
    os.replace(temporary, path)
    fsync_dir(Path(path).parent)


def publish_once(temporary: Path, path: Path) -> bool:
    """Put the finished `temporary` at `path` unless a file is there already: True if put.

    A hard link, so of several writers racing for `path` exactly one wins; where the filesystem
    has no hard links, a rename when `path` is still absent.
    """
    try:
        os.link(temporary, path)  # fails if another writer got there first
    except FileExistsError:
        return False
    except OSError:  # no hard links on this filesystem
        if path.exists():
            return False
        os.replace(temporary, path)
    fsync_dir(path.parent)
    return True


def remove_leftovers(folder: Path, names: Iterable[str]) -> int:
    """Delete the temporary files killed runs left for these file names; how many there were."""
    removed = 0
    for name in names:
        for leftover in folder.glob(f".{glob.escape(name)}{TEMP_MARK}*"):
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, whole or not at all (temporary file, fsync, rename)."""
    descriptor, temporary = temporary_file(path.parent, path.name)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            sync(stream)
        replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """`text` (UTF-8) at `path`, whole or not at all."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, payload) -> None:
    """`payload` as indented JSON at `path`, whole or not at all (temporary file, fsync, rename)."""
    import json

    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
