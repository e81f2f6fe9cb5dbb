"""The file name a shard url stands for, which the files made from that shard are named after (a
cache shard, a caption table, an embeddings file).

    shard_file_name("a/00001.tar")                            # "00001.tar"
    shard_file_name("pipe:aws s3 cp s3://b/00001.tar.gz -")   # "00001.tar": a compressed tar gives .tar
"""

from __future__ import annotations

import shlex
from pathlib import Path
from urllib.parse import urlparse

COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class ShardNameError(ValueError):
    """A shard url whose file name does not end in .tar (or a compressed tar's suffix)."""


def shard_file_name(url: str) -> str:
    """The shard's file name for any url form: its basename (a compressed tar gives `.tar`)."""
    if url.startswith("pipe:"):
        # The first argument of the command that names a tar: `pipe:aws s3 cp s3://b/x.tar -` -> x.tar.
        try:
            tokens = shlex.split(url[len("pipe:"):])
        except ValueError:
            tokens = url[len("pipe:"):].split()
        paths = [token for token in tokens if _tar_name(token.rstrip("/").rsplit("/", 1)[-1])]
        base = paths[0].rstrip("/").rsplit("/", 1)[-1] if paths else ""
    elif "://" in url:
        base = urlparse(url).path.rsplit("/", 1)[-1]
    else:
        base = Path(url.removeprefix("file:")).name
    name = _tar_name(base)
    if name is None:
        raise ShardNameError(f"cannot name the cache shard for {url!r}: its file name does not end in .tar")
    return name


def _tar_name(base: str) -> str | None:
    for suffix in COMPRESSED_TAR_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)] + ".tar"
    return base if base.endswith(".tar") and len(base) > len(".tar") else None
