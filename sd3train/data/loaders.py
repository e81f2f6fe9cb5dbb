"""The iterables behind `ShardDataModule`: per-worker training streams, validation batches, and the
endless training iterable that moves the stream's position (`position.py`) along.

DataLoader workers persist across epochs; a worker streams epoch `first_epoch + k` on its k-th
`iter()` (torch re-iterates persistent workers once per `iter(loader)`), and every batch carries
its epoch, which `TrainBatches` checks against its own count before handing the batch on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sd3train.data.decoders import Skip, collate
from sd3train.data.position import StreamPosition
from sd3train.data.stream import DATA_KEY, Replay, StreamSpec, stream_epoch
from sd3train.data.tar_reader import RawSample, read_shard


class TrainShardStream(IterableDataset):
    """One rank's training batches; each `iter()` streams the next epoch (see the module docstring)."""

    def __init__(self, spec: StreamSpec, first_epoch: int, rank: int, world_size: int, replays: dict[int, Replay]):
        super().__init__()
        self.spec = spec
        self.first_epoch = first_epoch
        self.rank = rank
        self.world_size = world_size
        self.replays = replays  # worker -> Replay, for the first epoch only
        self.iterations = 0  # on this copy: in a worker, the worker's own count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.first_epoch + self.iterations
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        replay = self.replays.get(worker) if self.iterations == 0 else None
        self.iterations += 1
        yield from stream_epoch(self.spec, epoch, self.rank, self.world_size, worker, num_workers, replay)


class ValShardStream(IterableDataset):
    """Validation batches: shards in the given order, no shuffle, at most `max_batches`, one bucket each."""

    def __init__(self, urls: list[str], decoder, batch_size: int, max_batches: int):
        super().__init__()
        self.urls = urls
        self.decoder = decoder
        self.batch_size = batch_size
        self.max_batches = max_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        produced = 0
        pending: dict[Any, list] = {}
        if self.max_batches <= 0:
            return
        for url in self.urls:
            for raw in read_shard(url):
                if not isinstance(raw, RawSample):
                    continue
                item = self.decoder.decode(raw, 0)
                if isinstance(item, Skip):
                    continue
                samples = pending.setdefault(item.bucket, [])
                samples.append(item)
                if len(samples) == self.batch_size:
                    del pending[item.bucket]
                    yield collate(samples)
                    produced += 1
                    if produced == self.max_batches:
                        return
        for bucket in sorted(pending, key=str):
            yield collate(pending[bucket])
            produced += 1
            if produced == self.max_batches:
                return


class TrainBatches:
    """The infinite training iterable `ShardDataModule.train_dataloader()` returns.

    Owns a DataLoader with persistent workers and iterates it once per epoch. With
    `consume_when_handed_out` (no Lightning trainer) a batch counts as consumed when it is handed out;
    under a trainer, when the datamodule's `on_before_batch_transfer` sees it.
    """

    def __init__(
        self,
        position: StreamPosition,
        make_dataset: Callable[[int, dict[int, Replay]], TrainShardStream],
        *,
        num_workers: int,
        consume_when_handed_out: bool,
        describe: str,
    ):
        self._position = position
        self._make_dataset = make_dataset
        self._num_workers = num_workers
        self._consume_when_handed_out = consume_when_handed_out
        self._describe = describe  # what the stream is, for the error of an epoch that gave no batch
        self._loader: Optional[DataLoader] = None
        self._loader_epoch = -1  # the epoch the loader's next iter() streams
        self.wait_seconds = 0.0  # time spent waiting for the loader, for data/wait_fraction

    def _loader_for(self, epoch: int, replays: dict[int, Replay]) -> DataLoader:
        if self._loader is None or self._loader_epoch != epoch or replays:
            self._loader = DataLoader(
                self._make_dataset(epoch, replays),
                batch_size=None,  # batched inside the dataset
                num_workers=self._num_workers,
                persistent_workers=self._num_workers > 0,
                pin_memory=torch.cuda.is_available(),
            )
        self._loader_epoch = epoch + 1
        return self._loader

    def shutdown(self) -> None:
        """Stop the persistent workers now (else they live as long as this object)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        position = self._position
        epoch, replays = position.resume_point()
        while True:
            handed = 0
            iterator = iter(self._loader_for(epoch, replays))
            replays = {}
            while True:
                start = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                finally:
                    self.wait_seconds += time.perf_counter() - start
                cursor = batch[DATA_KEY]
                if cursor["epoch"] != epoch:
                    raise RuntimeError(
                        f"data worker streamed epoch {cursor['epoch']} while the datamodule is at epoch {epoch}: "
                        "DataLoader workers did not re-iterate once per epoch"
                    )
                if cursor.get("placeholder"):
                    continue
                if cursor.get("tail"):
                    position.record_tail(cursor)
                    continue
                handed += 1
                if self._consume_when_handed_out:
                    position.consume(batch)
                yield batch
            if handed == 0 and not position.resumed_mid_epoch(epoch):
                raise RuntimeError(f"epoch {epoch} gave no batch {self._describe} "
                                   f"(skipped so far: {dict(position.skipped) or 'none'})")
            epoch += 1
