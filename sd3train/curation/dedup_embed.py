"""The embed stage: one shard's images -> its descriptors, keyed by sample key.

    embedder = Embedder(descriptor, batch_size=64, threads=8)
    result = embedder.run(url)              # ShardEmbedding: keys, descriptors, skips, failure
    arrays = embeddings_arrays(result, descriptor.name)   # written by the stage (dedup_stages.py)

Samples are read with the tar reader in order; `threads` decode and prepare them (PIL releases
the GIL), `CHUNK_BATCHES` batches' worth at a time, so memory stays bounded whatever the shard
size. Prepared images are batched per shape (SSCD's short-side resize gives one shape per aspect
ratio; thumbnails have one shape), a batch being embedded when full, or, when more than
`PENDING_BATCHES` batches' worth wait, the fullest shape's partial batch; the rest at the end.
The batching therefore depends on the shard alone, and the rows are stored in shard order.

Skipped and counted (reasons as in training, `sd3train.data.skips`): `no_image` (no field of the
image extensions), `decode_error`, `duplicate_key` (the tar reader keeps the first group). A shard
that cannot be opened, or is cut short (`unreadable_shard`, `truncated_shard`), is a failure: no
output, so a rerun retries it.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sd3train.curation.dedup_files import read_arrays
from sd3train.curation.tasks import note_problem
from sd3train.data.skips import DECODE_ERROR, NO_IMAGE
from sd3train.data.tar_reader import RawSample, ShardProblem, read_shard

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CHUNK_BATCHES = 4  # samples decoded together: this many batches' worth
PENDING_BATCHES = 4  # prepared images waiting for a full batch of their shape: at most this many batches' worth


@dataclass
class ShardEmbedding:
    keys: list[str] = field(default_factory=list)
    descriptors: np.ndarray | None = None  # (len(keys), D) float32
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one detail
    failure: str | None = None

    def skip(self, reason: str, key: str | None, detail: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, f"{key}: {detail}" if key else detail)


class _ShapeBatcher:
    """Rows in (index, prepared array), embedded per shape in batches, results by index."""

    def __init__(self, batch_size: int, embed: Callable[[np.ndarray], np.ndarray]):
        self.batch_size = batch_size
        self.embed = embed
        self.pending: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        self.waiting = 0
        self.rows: dict[int, np.ndarray] = {}

    def add(self, index: int, prepared: np.ndarray) -> None:
        batch = self.pending.setdefault(prepared.shape, [])
        batch.append((index, prepared))
        self.waiting += 1
        if len(batch) == self.batch_size:
            self._embed(prepared.shape)
        if self.waiting > PENDING_BATCHES * self.batch_size:
            # The fullest partial batch goes now (ties: the one waiting longest).
            shape = max(self.pending, key=lambda s: (len(self.pending[s]), -self.pending[s][0][0]))
            self._embed(shape)

    def finish(self, count: int) -> np.ndarray:
        for shape in sorted(self.pending, key=lambda s: self.pending[s][0][0]):
            self._embed(shape)
        if count == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self.rows[index] for index in range(count)])  # (count, D)

    def _embed(self, shape: tuple[int, ...]) -> None:
        batch = self.pending.pop(shape)
        self.waiting -= len(batch)
        vectors = self.embed(np.stack([prepared for _, prepared in batch]))  # (B, D)
        for (index, _), vector in zip(batch, vectors, strict=True):
            self.rows[index] = vector


class Embedder:
    def __init__(self, descriptor, batch_size: int, threads: int = 1,
                 image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        self.descriptor = descriptor
        self.batch_size = batch_size
        self.threads = max(1, threads)
        self.image_extensions = image_extensions

    def _prepare(self, raw: RawSample) -> np.ndarray | tuple[str, str]:
        """The prepared array, or (skip reason, detail)."""
        extension = next((ext for ext in self.image_extensions if ext in raw.fields), None)
        if extension is None:
            return NO_IMAGE, f"no field in {list(self.image_extensions)} (has {sorted(raw.fields)})"
        try:
            image = Image.open(io.BytesIO(raw.fields[extension]))
            draft = self.descriptor.draft_size
            if image.format == "JPEG" and draft is not None:
                image.draft("RGB", draft)  # libjpeg scales down while decoding
            return self.descriptor.prepare(image)
        except Exception as error:  # noqa: BLE001  (PIL raises many types for bad data)
            return DECODE_ERROR, f"{type(error).__name__}: {error}"

    def run(self, url: str) -> ShardEmbedding:
        result = ShardEmbedding()
        batcher = _ShapeBatcher(self.batch_size, self.descriptor.embed)
        chunk: list[RawSample] = []

        def flush(pool: ThreadPoolExecutor) -> None:
            for raw, prepared in zip(chunk, pool.map(self._prepare, chunk)):
                if isinstance(prepared, tuple):
                    result.skip(prepared[0], raw.key, prepared[1])
                    continue
                batcher.add(len(result.keys), prepared)
                result.keys.append(raw.key)
            chunk.clear()

        with ThreadPoolExecutor(self.threads) as pool:
            for event in read_shard(url):
                if isinstance(event, ShardProblem):
                    note_problem(result, event)
                    continue
                chunk.append(event)
                if len(chunk) >= CHUNK_BATCHES * self.batch_size:
                    flush(pool)
            if result.failure is not None:
                return result
            flush(pool)
        result.descriptors = batcher.finish(len(result.keys))
        return result


def embeddings_arrays(result: ShardEmbedding, descriptor_name: str) -> dict[str, np.ndarray]:
    """What an embeddings file holds (dedup_files.py): keys, descriptors, the descriptor's name."""
    descriptors = result.descriptors if result.descriptors is not None and len(result.keys) else np.zeros((0, 0))
    return {
        "keys": np.array(result.keys, dtype=np.str_),
        "descriptors": np.ascontiguousarray(descriptors, dtype=np.float32),
        "descriptor": np.array(descriptor_name),
    }


def embeddings_descriptor(path: Path) -> str:
    """The descriptor name an embeddings file was made with."""
    return str(read_arrays(path, ("descriptor",))["descriptor"])


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray, str]:
    """(keys, descriptors (N, D) float32, descriptor name) of an embeddings file."""
    arrays = read_arrays(path)
    return arrays["keys"].tolist(), arrays["descriptors"], str(arrays["descriptor"])
