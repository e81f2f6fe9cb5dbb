"""Reading webdataset / img2dataset tar shards without ever crashing on bad data.

`read_shard(url)` streams one shard and yields, in order, a `RawSample` per sample and a
`ShardProblem` per problem found; it never raises for bad data and never logs or counts (the
caller counts the events).

Urls: a local path (absolute or relative), a `file:` url, a webdataset `pipe:COMMAND` url
(COMMAND runs through the shell and its stdout is the tar), or any other `scheme://` url, which
goes through `webdataset.gopen` (http(s) via curl, gs:// via gsutil, ...; `s3://` has no handler
there: use `pipe:aws s3 cp s3://b/a.tar -`).

Samples: the tar is read with `tarfile` in stream mode (`r|*`, gzip/bz2/xz detected), never
seeking, so pipes work. Only regular files count; directories, links, and members whose basename
starts with "." or has no extension (no dot, or a trailing dot) are skipped (webdataset's own
regex would make "a/.DS_Store" key "a/"). A member's key is its name up to the first dot
of its basename, directory included, and the rest (lower-cased) is its extension
("a/b/000123.syn.txt" -> key "a/b/000123", extension "syn.txt"). Consecutive members with the
same key form one sample, yielded once the next key starts or the archive ends.

Problems (`ShardProblem.reason`):
- `unreadable_shard` (key None, nothing else yielded): the shard cannot be opened (missing file,
  permission denied, unknown scheme) or no valid first tar header could be read (empty or
  non-tar data, a pipe command that fails before writing one).
- `duplicate_key`: a key appears again after other keys, or one extension appears twice in a
  group (which, as in webdataset, starts a new group with the same key). The later group is
  dropped whole; the first one is kept as yielded.
- `truncated_shard`, then reading stops: the data ends or breaks after the first header. The
  pending sample is dropped (it may be missing members); samples that completed before, i.e. whose
  next key's header was read, are kept.

What tarfile does, and what is therefore detected as truncated:
- data ends inside a member's data or its 512-byte padding: tarfile raises ReadError
  ("unexpected end of data") when reading or skipping that member -> detected;
- data ends inside a header, exactly at a member boundary (no end-of-archive zero block), or a
  header is corrupt (bad checksum, garbage): tarfile silently treats it as the end of the
  archive. The header error that ended the archive is recorded here (through a TarInfo subclass),
  and anything but the zero end-of-archive block is reported -> detected;
- compressed shards: a cut in the compressed data shows up the same way in the decompressed
  stream; corrupt compressed data raises ReadError / zlib errors -> detected;
- a pipe command that exits non-zero: its status is checked when its stdout reaches EOF before
  the end-of-archive block; every byte it wrote is still read first, so a cut stream with a bad
  status is truncated_shard (or unreadable_shard before a first header).
Not detected: anything after the first zero block (lost trailing padding, a missing gzip
trailer, data appended after the archive, a tail of the file zeroed by a crashed copy), a
non-zero exit status after the whole archive was written, corrupt bytes inside a member's data
(the tar has no checksum for data; decoding the image is the caller's job), and for urls through
`webdataset.gopen` (http, ...) its Pipe may raise on a bad exit status before the last bytes are
read, so there truncated vs unreadable depends on timing.

Resources: the file, or the pipe process and its process group, is closed and reaped in all
cases, also when the consumer stops iterating early (the generator's finally). A pipe command's
stderr goes to a temporary file whose tail becomes part of the problem's detail.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

TRUNCATED_SHARD = "truncated_shard"
UNREADABLE_SHARD = "unreadable_shard"
DUPLICATE_KEY = "duplicate_key"

# Errors that mean "the bytes are bad or the source failed", never a bug in this module.
_READ_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, OSError, zlib.error)
try:
    import lzma

    _READ_ERRORS += (lzma.LZMAError,)
except ImportError:  # Python built without lzma: tarfile cannot open xz shards anyway
    pass

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_STDERR_TAIL_BYTES = 500
_PIPE_TERM_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RawSample:
    key: str
    url: str
    fields: dict[str, bytes]


@dataclass(frozen=True)
class ShardProblem:
    url: str
    reason: str
    key: str | None
    detail: str


Event = RawSample | ShardProblem


class _Stream(Protocol):
    """What tarfile's stream mode needs: a local file, a _PipeStream or webdataset's Pipe."""

    def read(self, size: int = -1) -> bytes: ...

    def close(self) -> None: ...


def read_shard(url: str) -> Iterator[Event]:
    """Yield the samples of one tar shard and a ShardProblem for each problem; never raises for bad data."""
    try:
        stream = _open(url)
    except (*_READ_ERRORS, ValueError) as e:  # gopen raises ValueError for an unknown scheme
        yield ShardProblem(url, UNREADABLE_SHARD, None, _describe(e))
        return
    try:
        yield from _read_stream(url, stream)
    finally:
        _close_quietly(stream)


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) by webdataset's rule, or None for a hidden or extension-less basename."""
    base = name.rsplit("/", 1)[-1]
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return name[: len(name) - len(base)] + stem, ext.lower()


# ---------------------------------------------------------------- opening


def _open(url: str) -> _Stream:
    if url.startswith("pipe:"):
        return _PipeStream(url[len("pipe:") :])
    if url.startswith("file:"):
        return open(url2pathname(urlparse(url).path), "rb")
    if _URL_SCHEME.match(url):
        # Imported here: webdataset imports torch (seconds), which local shards never need.
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


class _PipeStream:
    """stdout of a shell command, read to the end before its exit status is checked.

    webdataset's Pipe checks the status after every read and drops the bytes just read when the
    process has already failed, so a stream cut by a failing command could look unreadable.
    """

    def __init__(self, command: str) -> None:
        self._stderr = tempfile.TemporaryFile()
        try:
            # Own process group: closing early must stop the whole pipeline, not just the shell.
            # SLURM sends the preemption signal (USR1) to every process of the job step, and a
            # download dying of it would count as bad data: ignored here, and so (an ignored
            # signal survives exec) in everything the command starts.
            self._proc = subprocess.Popen(
                f"trap '' USR1; {command}", shell=True, stdout=subprocess.PIPE, stderr=self._stderr,
                start_new_session=True,
            )
        except BaseException:
            self._stderr.close()
            raise
        assert self._proc.stdout is not None
        self._stdout: IO[bytes] = self._proc.stdout

    def read(self, size: int = -1) -> bytes:
        data = self._stdout.read(size)
        if not data and size != 0:
            status = self._proc.wait()
            if status != 0:
                raise OSError(f"pipe command exited with status {status}{self._stderr_tail()}")
        return data

    def close(self) -> None:
        if self._stdout.closed:
            return
        self._stdout.close()
        if self._proc.poll() is None:
            self._stop_group()
        self._stderr.close()

    def _stop_group(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:  # the group already ended
                pass
            try:
                self._proc.wait(timeout=_PIPE_TERM_TIMEOUT_S)
                return
            except subprocess.TimeoutExpired:
                continue
        self._proc.wait()

    def _stderr_tail(self) -> str:
        try:
            size = self._stderr.seek(0, os.SEEK_END)
            self._stderr.seek(max(0, size - _STDERR_TAIL_BYTES))
            tail = self._stderr.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return f": {tail}" if tail else ""


def _close_quietly(stream: _Stream | tarfile.TarFile) -> None:
    try:
        stream.close()
    except Exception:  # gopen's Pipe raises on a bad exit status at close: already reported or irrelevant
        pass


# ---------------------------------------------------------------- reading


class _HeaderErrorLog:
    """Remembers the header error that made tarfile stop.

    tarfile ends iteration silently, as if at the end of the archive, on a missing, cut or
    corrupt header after the first one; only the zero end-of-archive block really is the end.
    """

    def __init__(self) -> None:
        self.last: tarfile.HeaderError | None = None
        log = self

        class RecordingTarInfo(tarfile.TarInfo):
            @classmethod
            def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
                try:
                    info = super().fromtarfile(tf)
                except tarfile.HeaderError as e:
                    log.last = e
                    raise
                log.last = None
                return info

        self.tarinfo_class = RecordingTarInfo

    def truncation(self, offset: int) -> str | None:
        """Why the archive ended early, or None when it ended at the end-of-archive block."""
        e = self.last
        if e is None or isinstance(e, tarfile.EOFHeaderError):
            return None
        if isinstance(e, tarfile.EmptyHeaderError):
            return f"no end-of-archive block: data ends at a member boundary (offset {offset})"
        if isinstance(e, tarfile.TruncatedHeaderError):
            return f"data ends inside a member header (offset {offset})"
        return f"{type(e).__name__} at offset {offset}: {e}"


def _read_stream(url: str, stream: _Stream) -> Iterator[Event]:
    headers = _HeaderErrorLog()
    try:
        # Opening reads the first header: failing here means no valid tar data at all.
        tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=headers.tarinfo_class)
    except _READ_ERRORS as e:
        yield ShardProblem(url, UNREADABLE_SHARD, None, _describe(e))
        return
    try:
        yield from _read_members(url, tf, headers)
    finally:
        _close_quietly(tf)


def _read_members(url: str, tf: tarfile.TarFile, headers: _HeaderErrorLog) -> Iterator[Event]:
    groups = _Grouper(url)
    while True:
        try:
            info = tf.next()
        except _READ_ERRORS as e:
            yield ShardProblem(url, TRUNCATED_SHARD, groups.key, _describe(e))
            return
        if info is None:
            break
        tf.members = []  # tarfile keeps every TarInfo otherwise: memory would grow with the shard
        name = split_member_name(info.name) if info.isreg() else None
        if name is None:
            continue  # tarfile skips its data on the next next()
        yield from groups.start_member(*name)
        try:
            data = _read_data(tf, info)
        except _READ_ERRORS as e:
            yield ShardProblem(url, TRUNCATED_SHARD, groups.key, _describe(e))
            return
        groups.add_data(name[1], data)
    reason = headers.truncation(tf.offset)
    if reason is not None:
        yield ShardProblem(url, TRUNCATED_SHARD, groups.key, reason)
        return
    yield from groups.finish()


def _read_data(tf: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(info)
    if f is None:  # not expected for a regular file
        return b""
    with f:
        return f.read()


class _Grouper:
    """Groups consecutive members by key and drops duplicate groups; the pending group is `key`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.key: str | None = None
        self._fields: dict[str, bytes] = {}
        self._dropped = False
        self._seen: set[str] = set()  # one short string per sample: bounded by the shard

    def start_member(self, key: str, ext: str) -> Iterator[Event]:
        """Yield what this member's header settles: the previous sample and/or a duplicate problem."""
        if key == self.key and ext not in self._fields:
            return
        repeated_ext = key == self.key
        yield from self.finish()
        self.key = key
        self._dropped = key in self._seen
        self._seen.add(key)
        if self._dropped:
            yield ShardProblem(self.url, DUPLICATE_KEY, key, _duplicate_detail(key, ext, repeated_ext))

    def add_data(self, ext: str, data: bytes) -> None:
        # A dropped group keeps only its extensions, to split it like a kept one.
        self._fields[ext] = b"" if self._dropped else data

    def finish(self) -> Iterator[Event]:
        if self.key is not None and not self._dropped:
            yield RawSample(self.key, self.url, self._fields)
        self.key = None
        self._fields = {}
        self._dropped = False


def _duplicate_detail(key: str, ext: str, repeated_ext: bool) -> str:
    if repeated_ext:
        return f"extension {ext!r} appears twice for key {key!r}: the later group is dropped"
    return f"key {key!r} appears again after other keys: the later group is dropped"


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
