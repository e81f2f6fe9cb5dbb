"""Writing webdataset shards in the img2dataset layout, with a manifest.

Each sample becomes `<key>.png|jpg`, `<key>.txt` and optionally `<key>.json` inside
`{prefix}-{000000..}.tar`; a sample may also carry extra sidecar members (`<key>.syn.txt`, ...) and
already-encoded image bytes under their own extension (`EncodedImage`: jpg, jpeg, png, webp). Every tar is written under a temporary name and renamed once complete,
so a reader (or a re-run after a crash) never sees half a shard. Tar headers carry fixed
mtime/uid/gid/names, so the same samples give byte-identical shards on every machine.

`manifest.json` in the output folder lists every shard (name, sample count, bytes, sha256); one
folder may hold several prefixes (train, val): writing a prefix replaces only its own entries.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

from PIL import Image

from sd3train.durable import replace, sync, temporary_file, write_json_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Fixed tar header fields: reproducible shards need them independent of the clock and the user.
TAR_MTIME = 0
TAR_USER = "sd3train"
TAR_GROUP = "sd3train"
TAR_MODE = 0o444
PNG_COMPRESS_LEVEL = 6
JPEG_QUALITY = 95

# Extensions an already-encoded image may keep inside the tar (webdataset decodes all of them).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Member extensions a sidecar may not take: the caption, the metadata and any image extension, so a
# reader never sees two captions or two images for one key.
RESERVED_EXTENSIONS = frozenset(("txt", "json", *IMAGE_EXTENSIONS))
# Dot-separated parts of letters, digits, '-' and '_'; a leading '_' would make webdataset treat the
# member as metadata and drop it, and an empty part would give `key..txt`.
_EXTENSION_RE = re.compile(r"[A-Za-z0-9-][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")


@dataclass(frozen=True)
class EncodedImage:
    """Image bytes written unchanged as `<key>.<ext>`, whatever `write_shards(image_format=...)` says."""

    data: bytes
    ext: str

    def __post_init__(self) -> None:
        if self.ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"image extension must be one of {IMAGE_EXTENSIONS}, got {self.ext!r}")
        if not isinstance(self.data, (bytes, bytearray)):
            raise TypeError(f"EncodedImage.data must be bytes, got {type(self.data).__name__}")


ImageInput = Union[Image.Image, bytes, EncodedImage]


class ShardSample(NamedTuple):
    """One sample; a plain `(key, image, caption, extra)` or `(..., sidecars)` tuple works the same.

    `sidecars` maps extra member extensions (e.g. `"syn.txt"`) to their bytes, written as `<key>.<ext>`.
    """

    key: str
    image: ImageInput
    caption: str
    extra: Optional[dict] = None
    sidecars: Optional[Mapping[str, bytes]] = None


Sample = Union[
    tuple[str, ImageInput, str, Optional[dict]],
    tuple[str, ImageInput, str, Optional[dict], Optional[Mapping[str, bytes]]],
    ShardSample,
]


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _is_shard_of(name: str, prefix: str) -> bool:
    return re.fullmatch(re.escape(prefix) + r"-\d{6}\.tar", name) is not None


def sha256_file(path: Union[str, Path], chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def encode_image(image: Union[Image.Image, bytes], image_format: str) -> bytes:
    """PIL image -> PNG/JPEG bytes with fixed encoder settings (bytes pass through unchanged)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif image_format == "jpg":
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    return buffer.getvalue()


def check_sidecar_ext(ext: str) -> str:
    """`ext` if it can name a sidecar member (`<key>.<ext>`), else ValueError saying why."""
    if not isinstance(ext, str) or _EXTENSION_RE.fullmatch(ext) is None:
        raise ValueError(
            f"sidecar extension {ext!r} must be dot-separated parts of letters, digits, '-' and '_', "
            "with no leading dot or '_'"
        )
    if ext.lower() in RESERVED_EXTENSIONS:
        raise ValueError(f"sidecar extension {ext!r} is reserved (one of {sorted(RESERVED_EXTENSIONS)})")
    return ext


def _image_member(image: ImageInput, image_format: str) -> tuple[str, bytes]:
    """(extension, bytes) of a sample's image member."""
    if isinstance(image, EncodedImage):
        return image.ext, bytes(image.data)
    return image_format, encode_image(image, image_format)


def _as_shard_sample(sample: Sample) -> ShardSample:
    if isinstance(sample, ShardSample):
        return sample
    if len(sample) not in (4, 5):
        raise ValueError(f"a sample is (key, image, caption, extra[, sidecars]), got {len(sample)} fields")
    return ShardSample(*sample)


def _record(sample: Sample, image_format: str) -> dict[str, Any]:
    """The TarWriter record of one sample: `{"__key__": key, ext: bytes, ...}`."""
    key, image, caption, extra, sidecars = _as_shard_sample(sample)
    if not key or "." in key:
        # webdataset splits the file name at the first dot: a dotted key would break grouping.
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.'")
    image_ext, image_bytes = _image_member(image, image_format)
    record: dict[str, Any] = {"__key__": key, image_ext: image_bytes, "txt": caption.encode("utf-8")}
    if extra is not None:
        record["json"] = json.dumps(extra, sort_keys=True).encode("utf-8")
    for ext, data in (sidecars or {}).items():
        check_sidecar_ext(ext)
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"sidecar {key}.{ext} must be bytes, got {type(data).__name__}")
        record[ext] = bytes(data)
    return record


def read_manifest(out_dir: Union[str, Path]) -> Optional[dict[str, Any]]:
    """The folder's manifest, or None if it has none (or an unreadable one)."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return None
    return manifest


def verify_shards(out_dir: Union[str, Path], entries: list[dict], check_sha256: bool = True) -> list[str]:
    """Problems with the listed shards on disk (missing, wrong size, wrong hash); empty when all match."""
    problems = []
    for entry in entries:
        path = Path(out_dir) / entry["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif check_sha256 and sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_one_shard(path: Path, samples: list[Sample], image_format: str) -> dict:
    # Imported here: webdataset imports torch (about 3 s), which an up-to-date check never needs.
    import webdataset as wds

    descriptor, temporary = temporary_file(path.parent, path.name)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            # encoder=False: we hand TarWriter bytes we encoded with fixed settings.
            writer = wds.TarWriter(
                stream, user=TAR_USER, group=TAR_GROUP, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False
            )
            for sample in samples:
                writer.write(_record(sample, image_format))
            writer.close()
            sync(stream)
        replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return {"name": path.name, "samples": len(samples), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_shards(
    samples: Iterable[Sample],
    out_dir: Union[str, Path],
    prefix: str,
    samples_per_shard: int,
    image_format: str = "png",
    source: Optional[dict] = None,
) -> list[dict]:
    """Write `(key, image, caption, extra[, sidecars])` samples to `{out_dir}/{prefix}-000000.tar, ...`.

    `image` is a PIL image (encoded with fixed settings as `image_format`), already-encoded bytes
    (stored as `<key>.<image_format>`) or an `EncodedImage` (stored unchanged under its own
    extension); `extra`, if not None, is stored as `<key>.json`; `sidecars`, if given (5th element or
    `ShardSample.sidecars`), maps further extensions such as `"syn.txt"` to bytes stored as `<key>.<ext>`. `source` (optional, JSON-serialisable) records how the samples
    were made, under `manifest["sources"][prefix]`; tools compare it to skip a rebuild.

    Returns this prefix's manifest entries `{"name", "samples", "bytes", "sha256"}` in shard order.
    Shards of the same prefix listed by an older manifest and not rewritten now are deleted.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if not prefix or "/" in prefix:
        raise ValueError(f"prefix {prefix!r} must be a non-empty file name prefix")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    entries = [
        _write_one_shard(out_dir / shard_name(prefix, shard_index), chunk, image_format)
        for shard_index, chunk in enumerate(_chunks(samples, samples_per_shard))
    ]

    old = read_manifest(out_dir) or {"version": MANIFEST_VERSION, "shards": [], "sources": {}}
    kept = [entry for entry in old.get("shards", []) if not _is_shard_of(entry["name"], prefix)]
    new_names = {entry["name"] for entry in entries}
    for entry in old.get("shards", []):
        if _is_shard_of(entry["name"], prefix) and entry["name"] not in new_names:
            (out_dir / entry["name"]).unlink(missing_ok=True)
    sources = {name: value for name, value in old.get("sources", {}).items() if name != prefix}
    if source is not None:
        sources[prefix] = source
    manifest = {
        "version": MANIFEST_VERSION,
        "shards": sorted(kept + entries, key=lambda entry: entry["name"]),
        "sources": sources,
    }
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return entries
