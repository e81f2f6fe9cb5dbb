"""One (rank, DataLoader worker)'s training batches for one epoch, and how resume replays them.

The stream of a worker in an epoch is a pure function of (plan, seed, epoch, rank, worker,
decoder, batch size, shuffle buffer, blocklist, caption tables):

    shards (ShardPlan) -> samples (read_shard; problems counted) -> blocklist -> caption table
    join (caption_tables.py: each shard's synthetic captions by key) -> shuffle buffer
    seeded ("samples", seed, epoch, rank, worker) -> probe/decode -> per-bucket batches

A batch is emitted when its bucket fills; at the end of the epoch each partly filled bucket is
emitted as a smaller batch (or dropped with `drop_partial`), buckets in sorted order.

Samples wait in their bucket as raw bytes (probed: caption, header, bucket); a bucket's samples
are decoded when it holds a batch's worth, those that fail to decode are dropped, and the batch
is emitted once `batch_size` decoded samples are ready.

Every item carries `DATA_KEY`: {"epoch", "worker", "index" (1-based batch number of this worker in
this epoch), "read", "skipped" {reason: n}, "bad_by_shard", "failed" [(url, key)], "shards_opened",
"shards_lost"}, the counts being what happened since the worker's previous batch. The stream
position (sd3train/data/position.py) records them when a batch is *consumed*. A worker ends its epoch with a `"tail"` item holding the
counts after its last batch (no samples).

Resume (`Replay`): the worker runs the same stream with `probe` only (no pixel decoding; the tar
bytes are read again), treating the recorded failures as decode failures on arrival, until it
has formed `skip_batches` batches (checked against the digest of the last consumed batch's keys);
then it carries on live. A batch holds the first `batch_size` samples of its bucket that decode,
either way. `placeholder` makes the worker first emit one empty item, which puts DataLoader's
round-robin back on the worker whose turn was next (`TrainBatches` drops it).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

from sd3train.data.caption_tables import SyntheticCaptions
from sd3train.data.decoders import Decoded, Skip, collate
from sd3train.data.folder import SCHEME as FOLDER_SCHEME
from sd3train.data.folder import read_folder_chunk
from sd3train.data.skips import BLOCKLISTED, DECODE_ERROR, NOT_BAD, TRUNCATED_SHARD, UNREADABLE_SHARD, log_skip
from sd3train.data.sources import ShardPlan
from sd3train.data.tar_reader import RawSample, ShardProblem, read_shard
from sd3train.runtime.rng import derive_seed

DATA_KEY = "_data"  # per-batch bookkeeping, removed before the batch reaches the model


def buffered_shuffle(samples: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of `buffer_size` items (<= 1: pass through)."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class Replay:
    """Where a resumed worker picks up: after `skip_batches` batches of its epoch.

    `failed`: (url, key) of the samples that failed to decode before the checkpoint; `last_keys`:
    a digest of the keys of the last consumed batch, checked when the replay reaches it (shards or
    settings changed since the checkpoint would otherwise go unnoticed); `tail_counted`: the
    worker's end-of-epoch counts were already recorded.
    """

    skip_batches: int = 0
    failed: frozenset[tuple[str, str]] = frozenset()
    placeholder: bool = False
    last_keys: Optional[str] = None
    tail_counted: bool = False


class DataResumeError(RuntimeError):
    """The stream replayed after a resume is not the one the checkpoint recorded."""


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]


@dataclass
class StreamSpec:
    """Everything a worker's stream depends on besides (epoch, rank, worker)."""

    plan: ShardPlan
    decoder: Any  # ImageDecoder or CachedDecoder: probe(raw), decode(raw, epoch)
    batch_size: int
    shuffle_buffer: int
    seed: int
    blocklist: frozenset[str] = field(default_factory=frozenset)
    drop_partial: bool = False
    captions: Optional[SyntheticCaptions] = None  # caption tables joined by key as each shard is read


class _Report:
    """Counts since the worker's previous batch (what rides along with the next one)."""

    def __init__(self) -> None:
        self.read = 0
        self.skipped: Counter[str] = Counter()
        self.bad_by_shard: Counter[str] = Counter()
        self.failed: list[tuple[str, str]] = []
        self.shards_opened = 0
        self.shards_lost = 0

    def skip(self, reason: str, url: str) -> None:
        self.skipped[reason] += 1
        if reason not in NOT_BAD:
            self.bad_by_shard[url] += 1

    def take(self) -> dict[str, Any]:
        report = {
            "read": self.read, "skipped": dict(self.skipped), "bad_by_shard": dict(self.bad_by_shard),
            "failed": [list(pair) for pair in self.failed], "shards_opened": self.shards_opened,
            "shards_lost": self.shards_lost,
        }
        self.__init__()
        return report


def _raw_samples(spec: StreamSpec, urls: list[str], report: _Report, live: list[bool]) -> Iterator[RawSample]:
    """Samples of `urls` in order; shard problems and blocklisted keys are counted, not yielded.

    With caption tables, each sample carries its synthetic caption from its shard's table."""
    for url in urls:
        report.shards_opened += 1
        captions = spec.captions.for_shard(url, log=live[0]) if spec.captions is not None else None
        for item in read_folder_chunk(url) if url.startswith(FOLDER_SCHEME) else read_shard(url):
            report.read += 1
            if isinstance(item, ShardProblem):
                log_skip(item.reason, item.url, item.key, item.detail, live[0])
                report.skip(item.reason, item.url)
                if item.reason in (TRUNCATED_SHARD, UNREADABLE_SHARD):
                    report.shards_lost += 1
            elif item.key in spec.blocklist:
                report.skip(BLOCKLISTED, item.url)
            else:
                yield item if captions is None else captions.attach(item)


def stream_epoch(
    spec: StreamSpec,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    replay: Optional[Replay] = None,
) -> Iterator[dict[str, Any]]:
    """The worker's batches of `epoch` (see the module docstring)."""
    replay = replay or Replay()
    urls = spec.plan.shards(epoch, rank, world_size, worker, num_workers)
    rng = random.Random(derive_seed("samples", spec.seed, epoch, rank, worker))
    report = _Report()
    live = [replay.skip_batches == 0]  # a list: _raw_samples reads it as it changes
    formed = 0  # batches formed this epoch (replayed ones included)
    # Per bucket: samples only probed so far (raw bytes: a few hundred kB each, not decoded
    # pixels), and samples decoded while a batch was being formed.
    pending: dict[Any, list[RawSample]] = {}
    ready: dict[Any, list[Decoded]] = {}

    def cursor(index: int) -> dict[str, Any]:
        return {"epoch": epoch, "worker": worker, "index": index}

    def decode_pending(bucket: Any) -> None:
        for raw in pending.pop(bucket, []):
            item = spec.decoder.decode(raw, epoch)
            if isinstance(item, Skip):
                log_skip(item.reason, raw.url, raw.key, item.detail, True)
                report.skip(item.reason, raw.url)
                report.failed.append((raw.url, raw.key))
            else:
                ready.setdefault(bucket, []).append(item)

    def replayed_batch(keys: list[str]) -> None:
        nonlocal formed
        formed += 1
        if formed < replay.skip_batches:
            return
        if replay.last_keys is not None and keys_digest(keys) != replay.last_keys:
            raise DataResumeError(
                f"resuming rank {rank} worker {worker} of epoch {epoch}: its batch {formed} is not the one the "
                "checkpoint recorded; the shards, the blocklist or the data settings changed since. Restore "
                "them, or set data.resume_resplit=true to start the next epoch instead."
            )
        live[0] = True
        report.take()  # what the replay counted is already in the restored totals

    def live_batch(samples: list[Decoded]) -> dict[str, Any]:
        nonlocal formed
        formed += 1
        batch = collate(samples)
        batch[DATA_KEY] = {**cursor(formed), **report.take()}
        return batch

    if replay.placeholder:
        yield {DATA_KEY: {**cursor(0), "placeholder": True}}
    for raw in buffered_shuffle(_raw_samples(spec, urls, report, live), spec.shuffle_buffer, rng):
        bucket = spec.decoder.probe(raw)
        if not live[0] and not isinstance(bucket, Skip) and (raw.url, raw.key) in replay.failed:
            bucket = Skip(DECODE_ERROR, "failed to decode before the checkpoint")
        if isinstance(bucket, Skip):
            log_skip(bucket.reason, raw.url, raw.key, bucket.detail, live[0])
            report.skip(bucket.reason, raw.url)
            continue
        pending.setdefault(bucket, []).append(raw)
        if len(pending[bucket]) + len(ready.get(bucket, [])) < spec.batch_size:
            continue
        if not live[0]:
            # Failures were taken out on arrival, so the bucket is a batch.
            replayed_batch([sample.key for sample in pending.pop(bucket)])
            continue
        decode_pending(bucket)
        if len(ready.get(bucket, [])) == spec.batch_size:
            yield live_batch(ready.pop(bucket))
    for bucket in sorted(set(pending) | set(ready), key=str):
        if spec.drop_partial:
            break
        if not live[0]:
            replayed_batch([sample.key for sample in pending.pop(bucket, [])])
            continue
        decode_pending(bucket)
        if ready.get(bucket):
            yield live_batch(ready.pop(bucket))
    if live[0] and not replay.tail_counted and (report.read or report.skipped):
        # What was read after the worker's last batch: counted once that batch is consumed.
        yield {DATA_KEY: {**cursor(formed), "tail": True, **report.take()}}
