"""One (rank, DataLoader worker)'s training batches for one epoch, and how resume replays them.

The stream of a worker in an epoch is a pure function of (plan, seed, epoch, rank, worker,
decoder, batch size, shuffle buffer, blocklist):

    shards (ShardPlan) -> samples (read_shard; problems counted) -> blocklist -> shuffle buffer
    seeded ("samples", seed, epoch, rank, worker) -> probe/decode -> per-bucket batches

A batch is emitted when its bucket fills; at the end of the epoch each partly filled bucket is
emitted as a smaller batch (or dropped with `drop_partial`), buckets in sorted order.

Every item carries `DATA_KEY`: {"epoch", "worker", "index" (1-based batch number of this worker in
this epoch), "read", "skipped" {reason: n}, "failed_keys"}, the counts being what happened since
the worker's previous batch. The datamodule records them when a batch is *consumed*. A worker
ends its epoch with a `"tail"` item holding the counts after its last batch (no samples).

Resume (`Replay`): the worker runs the same stream with `probe` only (no pixel decoding),
treating the recorded `failed_keys` as decode failures, until it has formed `skip_batches`
batches; it then decodes what is still pending and carries on live. `placeholder` makes the
worker first emit one empty item, which puts DataLoader's round-robin back on the worker whose
turn was next (the datamodule drops it).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from sd3train.data.decoders import Decoded, Skip, collate
from sd3train.data.skips import BLOCKLISTED, DECODE_ERROR, SkipLedger
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
    """Where a resumed worker picks up: after `skip_batches` batches of its epoch."""

    skip_batches: int = 0
    failed_keys: frozenset[str] = frozenset()
    placeholder: bool = False


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
    skip_budget: float = 1.0
    skip_budget_min_samples: int = 0


class _Report:
    """Counts since the worker's previous batch (what rides along with the next one)."""

    def __init__(self) -> None:
        self.read = 0
        self.skipped: Counter[str] = Counter()
        self.failed_keys: list[str] = []

    def take(self) -> dict[str, Any]:
        report = {"read": self.read, "skipped": dict(self.skipped), "failed_keys": list(self.failed_keys)}
        self.__init__()
        return report


def _raw_samples(
    spec: StreamSpec, urls: list[str], ledger: SkipLedger, report: _Report, live: list[bool]
) -> Iterator[RawSample]:
    """Samples of `urls` in order; shard problems and blocklisted keys are counted, not yielded."""
    for url in urls:
        for item in read_shard(url):
            ledger.count_read()
            report.read += 1
            if isinstance(item, ShardProblem):
                ledger.skip(item.reason, item.url, item.key, item.detail, log=live[0])
                report.skipped[item.reason] += 1
            elif item.key in spec.blocklist:
                ledger.skip(BLOCKLISTED, item.url, item.key, log=False)
                report.skipped[BLOCKLISTED] += 1
            else:
                yield item
            ledger.check_budget(spec.skip_budget, spec.skip_budget_min_samples)


def stream_epoch(
    spec: StreamSpec,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    ledger: SkipLedger,
    replay: Optional[Replay] = None,
) -> Iterator[dict[str, Any]]:
    """The worker's batches of `epoch` (see the module docstring); `ledger` accumulates its counts."""
    replay = replay or Replay()
    urls = spec.plan.shards(epoch, rank, world_size, worker, num_workers)
    rng = random.Random(derive_seed("samples", spec.seed, epoch, rank, worker))
    report = _Report()
    live = [replay.skip_batches == 0]  # a list: _raw_samples reads it as it changes
    formed = 0  # batches formed this epoch (replayed ones included)
    pending: dict[Any, list[Union[Decoded, RawSample]]] = {}

    def cursor(index: int) -> dict[str, Any]:
        return {"epoch": epoch, "worker": worker, "index": index}

    def emit(samples: list[Union[Decoded, RawSample]]) -> Optional[dict[str, Any]]:
        nonlocal formed
        formed += 1
        if not live[0]:
            if formed == replay.skip_batches:
                _go_live()
            return None
        batch = collate(samples)  # type: ignore[arg-type]  (live batches hold Decoded samples)
        batch[DATA_KEY] = {**cursor(formed), **report.take()}
        return batch

    def _go_live() -> None:
        # Pending samples were only probed: decode them now. Counts from the replay are already
        # in the restored totals, so the report starts empty.
        live[0] = True
        for bucket, samples in list(pending.items()):
            decoded = []
            for raw in samples:
                item = spec.decoder.decode(raw, epoch)
                if isinstance(item, Skip):  # decoded before the checkpoint, so it should decode now
                    ledger.skip(item.reason, raw.url, raw.key, item.detail)
                else:
                    decoded.append(item)
            pending[bucket] = decoded
        report.take()

    if replay.placeholder:
        yield {DATA_KEY: {**cursor(0), "placeholder": True}}
    for raw in buffered_shuffle(_raw_samples(spec, urls, ledger, report, live), spec.shuffle_buffer, rng):
        if live[0]:
            item = spec.decoder.decode(raw, epoch)
        else:
            item = spec.decoder.probe(raw)
            if not isinstance(item, Skip) and raw.key in replay.failed_keys:
                item = Skip(DECODE_ERROR, "failed to decode before the checkpoint")
        if isinstance(item, Skip):
            ledger.skip(item.reason, raw.url, raw.key, item.detail, log=live[0])
            report.skipped[item.reason] += 1
            if item.reason == DECODE_ERROR:
                report.failed_keys.append(raw.key)
            ledger.check_budget(spec.skip_budget, spec.skip_budget_min_samples)
            continue
        bucket = item.bucket if isinstance(item, Decoded) else item
        samples = pending.setdefault(bucket, [])
        samples.append(item if isinstance(item, Decoded) else raw)
        if len(samples) == spec.batch_size:
            del pending[bucket]
            batch = emit(samples)
            if batch is not None:
                yield batch
    if ledger.bad == ledger.read or ledger.read >= spec.skip_budget_min_samples:
        ledger.check_budget(spec.skip_budget, 0, final=True)
    if not spec.drop_partial:
        for bucket in sorted(pending, key=str):
            if pending[bucket]:
                batch = emit(pending[bucket])
                if batch is not None:
                    yield batch
    if live[0] and (report.read or report.skipped):
        # What was read after the worker's last batch: counted once that batch is consumed.
        yield {DATA_KEY: {**cursor(formed), "tail": True, **report.take()}}
