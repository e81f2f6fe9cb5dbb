"""An image folder as training data, read in place (`data=folder data.path=DIR`).

    urls = folder_shard_urls("photos/", repeats=2)     # ["folder:///abs/photos#0/16/0", ...]
    for item in read_folder_chunk(urls[0]): ...        # RawSample / ShardProblem, as read_shard yields

Every image under DIR (recursively; extensions jpg, jpeg, png, webp, in sorted path order) is one
sample keyed by its path relative to DIR without the extension ("cats/001"). Beside it, files
with the same stem add fields as a webdataset shard's members would: `001.txt` (the caption,
field "txt"), `001.syn.txt` (a synthetic caption) and `001.mask.png` (a loss mask; a PNG's alpha
channel is one too, sd3train/data/decoders.py). Masks are not samples.

The sorted list is cut into `chunks` interleaved virtual shards (chunk k holds images k, k + chunks,
...), each listed `repeats` times, so the shard plan, the shuffle, the per-rank and per-worker
split, the buckets, the skip counting and the sample-exact resume of the shard pipeline apply to a
folder unchanged (sd3train/data/stream.py). A file that cannot be read becomes a sample with no
bytes, which fails to decode and is skipped and counted like a corrupt image in a shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sd3train.data.tar_reader import RawSample, ShardProblem, UNREADABLE_SHARD

SCHEME = "folder://"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SIDECARS = {"txt": ".txt", "syn.txt": ".syn.txt", "mask.png": ".mask.png"}
MAX_CHUNKS = 64


def folder_images(root: Path) -> list[Path]:
    """The images under `root`, recursively, in sorted relative-path order (mask files excluded;
    hidden files and folders too)."""
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        name = path.name.lower()
        if name.endswith(".mask.png"):
            continue
        if name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS and "." in name:
            found.append(relative)
    return sorted(found, key=lambda relative: relative.as_posix())


def folder_shard_urls(path: str | Path, repeats: int = 1, chunks: int | None = None) -> list[str]:
    """The virtual shards of the folder `path`: `chunks` (default: one per image up to 64) interleaved
    parts, each `repeats` times."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: {path} is not a folder")
    count = len(folder_images(root))
    if count == 0:
        raise ValueError(f"data.path: {path} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return _chunk_urls(root, chunks or min(count, MAX_CHUNKS), repeats)


def _chunk_urls(root: Path, chunks: int, repeats: int) -> list[str]:
    return [f"{SCHEME}{root}#{chunk}/{chunks}/{repeat}" for repeat in range(repeats) for chunk in range(chunks)]


def class_image_stem(index: int) -> str:
    """The file stem of generated class image `index` (prior preservation)."""
    return f"class-{index:05d}"


def class_shard_urls(path: str | Path, count: int) -> list[str]:
    """The virtual shards of a class-image folder that will hold `count` images: fixed by the count,
    not by what the folder holds yet (its images are generated once training starts)."""
    return _chunk_urls(Path(path).resolve(), max(1, min(count, MAX_CHUNKS)), repeats=1)


def folder_prefix(path: str | Path) -> str:
    """What the urls of a folder's virtual shards start with (to tell its samples in a batch)."""
    return f"{SCHEME}{Path(path).resolve()}#"


def parse_folder_url(url: str) -> tuple[Path, int, int]:
    """(folder, chunk, chunks) of a virtual shard url."""
    location, _, part = url[len(SCHEME):].rpartition("#")
    chunk, chunks, _repeat = (int(number) for number in part.split("/"))
    return Path(location), chunk, chunks


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""  # decodes as nothing: skipped and counted as decode_error


def read_folder_chunk(url: str) -> Iterator[RawSample | ShardProblem]:
    """The samples of one virtual shard of a folder, in order."""
    root, chunk, chunks = parse_folder_url(url)
    if not root.is_dir():
        yield ShardProblem(url=url, key=None, reason=UNREADABLE_SHARD, detail=f"{root} is not a folder")
        return
    for relative in folder_images(root)[chunk::chunks]:
        image = root / relative
        stem = image.with_suffix("")
        extension = image.suffix.lower().lstrip(".")
        fields = {extension: _read(image)}
        for field, suffix in SIDECARS.items():
            sidecar = stem.parent / (stem.name + suffix)
            if sidecar.is_file():
                fields[field] = _read(sidecar)
        yield RawSample(key=stem.relative_to(root).as_posix(), url=url, fields=fields)
