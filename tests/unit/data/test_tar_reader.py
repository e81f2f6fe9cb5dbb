"""read_shard: samples exactly as written, and every kind of bad shard reported as one event, never raised."""

from __future__ import annotations

import io
import os
import random
import shlex
import signal
import tarfile
import time
from pathlib import Path

import pytest

from sd3train.data import tar_reader
from sd3train.data.tar_reader import (
    DUPLICATE_KEY,
    TRUNCATED_SHARD,
    UNREADABLE_SHARD,
    RawSample,
    ShardProblem,
    read_shard,
    split_member_name,
)

Members = list[tuple[str, bytes]]
open_shard = tar_reader._open


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write_tar(path: Path, members: Members, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def three_samples() -> Members:
    """000000..000002, each .jpg (1500 B, several blocks), .txt and .json."""
    return [
        member
        for i in range(3)
        for member in ((f"{i:06d}.jpg", payload(i, 1500)), (f"{i:06d}.txt", f"caption {i}".encode()),
                       (f"{i:06d}.json", b'{"i": %d}' % i))
    ]


def samples_of(members: Members, url: str) -> list[RawSample]:
    """The samples read_shard should yield for well-formed, consecutive members."""
    grouped: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        key, ext = split_member_name(name)
        grouped.setdefault(key, {})[ext] = data
    return [RawSample(key, url, fields) for key, fields in grouped.items()]


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (header offset, data offset)."""
    with tarfile.open(path) as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}


def cut_copy(src: Path, dst: Path, size: int) -> str:
    dst.write_bytes(src.read_bytes()[:size])
    return str(dst)


def truncated(url: str, key: str | None, problem: ShardProblem) -> bool:
    return (problem.url, problem.reason, problem.key) == (url, TRUNCATED_SHARD, key)


# ---------------------------------------------------------------- well-formed shards


def test_normal_shard_yields_keys_extensions_and_bytes_in_order(tmp_path):
    members = []
    for i in range(3):
        key = f"{i:06d}"
        members += [
            (f"{key}.jpg", payload(i, 3000)),
            (f"{key}.txt", f"a photo of thing {i}".encode()),
            (f"{key}.json", b'{"width": 64, "height": 48}'),
            (f"{key}.syn.txt", f"synthetic caption {i}".encode()),
        ]
    url = str(write_tar(tmp_path / "s.tar", members))
    events = list(read_shard(url))
    assert events == samples_of(members, url)
    assert [e.key for e in events] == ["000000", "000001", "000002"]
    assert all(list(e.fields) == ["jpg", "txt", "json", "syn.txt"] for e in events)
    assert events[1].fields["jpg"] == payload(1, 3000)


def test_key_keeps_directory_prefix(tmp_path):
    members = [
        ("a/b/000123.jpg", b"img"),
        ("a/b/000123.txt", b"cap"),
        ("part.v2/000124.TXT", b"cap2"),  # a dot in the directory is not the key's dot; extension lower-cased
    ]
    url = str(write_tar(tmp_path / "s.tar", members))
    assert list(read_shard(url)) == [
        RawSample("a/b/000123", url, {"jpg": b"img", "txt": b"cap"}),
        RawSample("part.v2/000124", url, {"txt": b"cap2"}),
    ]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("000123.jpg", ("000123", "jpg")),
        ("a/b/000123.syn.txt", ("a/b/000123", "syn.txt")),
        ("x.y/z.JSON", ("x.y/z", "json")),
        ("./000123.txt", ("./000123", "txt")),  # as `tar cf s.tar .` names members
        (".hidden.jpg", None),
        # webdataset's regex would give key "a/", extension "ds_store" (and "" for "a."): skipped here.
        ("a/.DS_Store", None),
        ("a.", None),
        ("README", None),
        ("a.b/c", None),
        ("a/", None),
    ],
)
def test_split_member_name(name, expected):
    assert split_member_name(name) == expected


def test_skips_directories_links_hidden_and_extensionless_members(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tf:
        tf.addfile(tarfile.TarInfo("000001"), None)  # a directory named like a key
        tf.getmember("000001").type = tarfile.DIRTYPE
        skipped = [(".hidden.txt", b"h"), ("000001/.DS_Store", b"d"), ("README", b"r")]
        for name, data in [("000001.jpg", b"img"), *skipped]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("000001.png")
        link.type, link.linkname = tarfile.SYMTYPE, "000001.jpg"
        tf.addfile(link)
        txt = tarfile.TarInfo("000001.txt")
        txt.size = 3
        tf.addfile(txt, io.BytesIO(b"cap"))
    assert list(read_shard(str(path))) == [RawSample("000001", str(path), {"jpg": b"img", "txt": b"cap"})]


def test_valid_empty_tar_yields_nothing(tmp_path):
    url = str(write_tar(tmp_path / "empty.tar", []))
    assert list(read_shard(url)) == []


def test_gzip_shard_reads_and_reports_truncation(tmp_path):
    members = three_samples()
    path = write_tar(tmp_path / "s.tar.gz", members, mode="w:gz")
    assert list(read_shard(str(path))) == samples_of(members, str(path))
    cut = cut_copy(path, tmp_path / "cut.tar.gz", path.stat().st_size // 2)
    *samples, problem = read_shard(cut)
    assert truncated(cut, problem.key, problem)
    assert samples == samples_of(members, cut)[: len(samples)]


# ---------------------------------------------------------------- truncated and corrupt shards


@pytest.mark.parametrize(
    "member, into, complete, pending",
    [
        ("000001.jpg", 700, 1, "000001"),  # first member of a sample
        ("000001.txt", 5, 1, "000001"),  # a later member: the partial sample is dropped
        ("000002.json", 3, 2, "000002"),  # the last member of the shard
    ],
)
def test_cut_inside_member_data(tmp_path, member, into, complete, pending):
    members = three_samples()
    path = write_tar(tmp_path / "s.tar", members)
    url = cut_copy(path, tmp_path / "cut.tar", member_offsets(path)[member][1] + into)
    events = list(read_shard(url))
    assert events[:-1] == samples_of(members, url)[:complete]
    assert truncated(url, pending, events[-1])
    assert "unexpected end of data" in events[-1].detail


def test_cut_inside_member_padding(tmp_path):
    members = three_samples()
    path = write_tar(tmp_path / "s.tar", members)
    data = member_offsets(path)["000002.jpg"][1]
    url = cut_copy(path, tmp_path / "cut.tar", data + 1500 + 10)  # 1500 B of data, then 548 B of padding
    events = list(read_shard(url))
    assert events[:-1] == samples_of(members, url)[:2]
    assert truncated(url, "000002", events[-1])


@pytest.mark.parametrize(
    "at, into, complete, pending, detail",
    [
        # tarfile itself stops silently at a missing or cut header; the pending sample may be incomplete.
        ("000002.jpg", 0, 1, "000001", "member boundary"),  # cut between samples
        ("000001.txt", 0, 1, "000001", "member boundary"),  # cut between members of one sample
        ("000002.jpg", 100, 1, "000001", "inside a member header"),
        ("end", 0, 2, "000002", "member boundary"),  # all members, no end-of-archive block
    ],
)
def test_cut_at_member_boundary_or_inside_header(tmp_path, at, into, complete, pending, detail):
    members = three_samples()
    path = write_tar(tmp_path / "s.tar", members)
    offsets = member_offsets(path)
    end = offsets["000002.json"][1] + 512  # the last member's data fits one block
    url = cut_copy(path, tmp_path / "cut.tar", (end if at == "end" else offsets[at][0]) + into)
    events = list(read_shard(url))
    assert events[:-1] == samples_of(members, url)[:complete]
    assert truncated(url, pending, events[-1])
    assert detail in events[-1].detail


def test_cut_after_first_end_of_archive_block_is_complete(tmp_path):
    members = three_samples()
    path = write_tar(tmp_path / "s.tar", members)
    end = member_offsets(path)["000002.json"][1] + 512
    url = cut_copy(path, tmp_path / "cut.tar", end + 512)  # second zero block and record padding lost
    assert list(read_shard(url)) == samples_of(members, url)


def test_corrupt_header_mid_shard_is_truncated(tmp_path):
    members = three_samples()
    path = write_tar(tmp_path / "s.tar", members)
    raw = bytearray(path.read_bytes())
    header = member_offsets(path)["000002.jpg"][0]
    raw[header : header + 512] = b"x" * 512
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    events = list(read_shard(str(bad)))
    assert events[:-1] == samples_of(members, str(bad))[:1]
    assert truncated(str(bad), "000001", events[-1])
    assert "InvalidHeaderError" in events[-1].detail


# ---------------------------------------------------------------- duplicate keys


def test_non_consecutive_duplicate_key_keeps_first_occurrence(tmp_path):
    members = [("a.jpg", b"a1"), ("a.txt", b"t1"), ("b.jpg", b"b")]
    members += [("a.jpg", b"a2"), ("a.txt", b"t2"), ("c.jpg", b"c")]
    url = str(write_tar(tmp_path / "s.tar", members))
    events = list(read_shard(url))
    assert events[0] == RawSample("a", url, {"jpg": b"a1", "txt": b"t1"})
    assert events[1] == RawSample("b", url, {"jpg": b"b"})
    assert (events[2].reason, events[2].key) == (DUPLICATE_KEY, "a")
    assert events[3:] == [RawSample("c", url, {"jpg": b"c"})]


def test_same_extension_twice_in_a_group_keeps_first_occurrence(tmp_path):
    members = [("a.jpg", b"a1"), ("a.txt", b"t1"), ("a.jpg", b"a2"), ("a.txt", b"t2"), ("b.jpg", b"b")]
    url = str(write_tar(tmp_path / "s.tar", members))
    events = list(read_shard(url))
    assert events[0] == RawSample("a", url, {"jpg": b"a1", "txt": b"t1"})
    assert (events[1].url, events[1].reason, events[1].key) == (url, DUPLICATE_KEY, "a")
    assert "'jpg' appears twice" in events[1].detail
    assert events[2:] == [RawSample("b", url, {"jpg": b"b"})]


# ---------------------------------------------------------------- opening: paths, urls, pipes


def test_missing_file_is_one_unreadable_problem(tmp_path):
    url = str(tmp_path / "missing.tar")
    [problem] = read_shard(url)
    assert (problem.url, problem.reason, problem.key) == (url, UNREADABLE_SHARD, None)
    assert "FileNotFoundError" in problem.detail


@pytest.mark.parametrize("content", [b"", b"this is not a tar file\n" * 40, b"\x1f\x8b" + b"\x00" * 600])
def test_non_tar_data_is_unreadable(tmp_path, content):
    path = tmp_path / "bad.tar"
    path.write_bytes(content)
    assert [(e.reason, e.key) for e in read_shard(str(path))] == [(UNREADABLE_SHARD, None)]


def test_unknown_url_scheme_is_unreadable():
    [problem] = read_shard("nosuchscheme://bucket/a.tar")
    assert (problem.reason, problem.key) == (UNREADABLE_SHARD, None)


def test_file_url_relative_path_and_pipe_cat_give_the_same_samples(tmp_path, monkeypatch):
    members = three_samples()
    path = write_tar(tmp_path / "s.tar", members)
    monkeypatch.chdir(tmp_path)
    for url in [str(path), "s.tar", f"file://{path}", f"pipe:cat {shlex.quote(str(path))}"]:
        assert list(read_shard(url)) == samples_of(members, url), url


def test_a_pipe_command_outlives_slurms_preemption_signal(tmp_path):
    """SLURM sends USR1 to every process of the job step: the download must not die of it."""
    path = write_tar(tmp_path / "s.tar", three_samples())
    stream = tar_reader._PipeStream(f"sleep 1; cat {shlex.quote(str(path))}")
    try:
        time.sleep(0.3)  # the shell has set its trap and is in `sleep`
        os.killpg(stream._proc.pid, signal.SIGUSR1)
        assert stream.read() == path.read_bytes()
    finally:
        stream.close()


def test_failing_pipe_command_is_unreadable():
    url = "pipe:echo 'access denied' >&2; exit 1"
    [problem] = read_shard(url)
    assert (problem.url, problem.reason, problem.key) == (url, UNREADABLE_SHARD, None)
    assert "status 1: access denied" in problem.detail


def test_pipe_failing_after_half_the_tar_is_truncated(tmp_path):
    members = three_samples()
    path = write_tar(tmp_path / "s.tar", members)
    half = member_offsets(path)["000001.jpg"][1] + 700
    url = f"pipe:head -c {half} {shlex.quote(str(path))}; echo 'connection reset' >&2; exit 1"
    events = list(read_shard(url))
    assert events[:-1] == samples_of(members, url)[:1]
    assert truncated(url, "000001", events[-1])
    assert "status 1: connection reset" in events[-1].detail


# ---------------------------------------------------------------- resources


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("stop", ["close", "del"])
def test_abandoned_generator_closes_its_file(tmp_path, monkeypatch, stop):
    opened = []  # holding the file here: only an explicit close, not its refcount, can free the fd

    def recording_open(url):
        opened.append(open_shard(url))
        return opened[-1]

    monkeypatch.setattr(tar_reader, "_open", recording_open)
    url = str(write_tar(tmp_path / "s.tar", three_samples()))
    before = open_fds()
    events = read_shard(url)
    assert next(events).key == "000000"
    assert open_fds() == before + 1
    if stop == "close":
        events.close()
    else:
        del events  # CPython finalises the generator at once, running its finally
    assert opened[0].closed
    assert open_fds() == before


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # killed, waiting for its (orphaned) parent's reaper


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_abandoned_pipe_is_killed_and_reaped(tmp_path):
    tar = write_tar(tmp_path / "s.tar", three_samples())
    pids = tmp_path / "pids"
    # The shell and a child keep running after the tar: closing early must stop both, not wait 30 s.
    q_pids, q_tar = shlex.quote(str(pids)), shlex.quote(str(tar))
    url = f"pipe:echo $$ > {q_pids}; cat {q_tar}; sleep 30 & echo $! >> {q_pids}; wait"
    before = open_fds()
    events = read_shard(url)
    assert next(events).key == "000000"
    deadline = time.monotonic() + 5
    while len(pids.read_text().split()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    shell, sleeper = map(int, pids.read_text().split())
    started = time.monotonic()
    events.close()
    assert time.monotonic() - started < 2
    assert open_fds() == before
    with pytest.raises(ChildProcessError):  # already reaped: no zombie left behind
        os.waitpid(shell, os.WNOHANG)
    while not process_gone(sleeper) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process_gone(sleeper)
