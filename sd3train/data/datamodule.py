"""Streaming webdataset shards into training and validation batches.

    from sd3train.config.schema import DataConfig
    from sd3train.data.datamodule import ShardDataModule
    datamodule = ShardDataModule(DataConfig(), seed=0)   # needs `python -m sd3train.tools.make_shapes --out data/shapes`
    batch = next(iter(datamodule.train_dataloader()))    # {"images": (B, 3, R, R) in [-1, 1], "captions": [...], "keys": [...], "urls": [...]}

Every random choice comes from a named generator with a seed derived from the run seed:
- shard order of epoch e: `("shards", seed, e)`, the same on every rank; rank r takes every
  world_size-th shard of it, and DataLoader worker w every num_workers-th shard of that;
- in-shard shuffle buffer: `("samples", seed, e, r, w)`.
So the stream is a pure function of (seed, epoch, world_size, num_workers, batch_size, shards).

The training stream is infinite (training is step-based): each epoch is one pass over the shards
(each worker drops its last partial batch), then the next epoch starts with a new shard order.
DataLoader workers persist across epochs; a worker streams epoch `first_epoch + k` on its k-th
`iter()` (torch re-iterates persistent workers once per `iter(loader)`), and every batch carries its
epoch, which the main process checks against its own counter before handing the batch on.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import braceexpand
import lightning
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from sd3train.config.schema import DataConfig
from sd3train.data.transforms import decode_caption, image_bytes_to_tensor, parse_extensions
from sd3train.paths import REPO_ROOT
from sd3train.runtime.rng import derive_seed

STATE_VERSION = 1


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def resolve_shard_urls(spec: str, root: Path = REPO_ROOT) -> list[str]:
    """Expand `"a-{000000..000007}.tar::b.tar"` into a list; relative local paths are taken from `root`.

    URLs (`scheme://...`, `pipe:...`) and absolute paths are kept as they are.
    """
    urls = []
    for pattern in spec.split("::"):
        for expanded in braceexpand.braceexpand(pattern.strip()):
            if _is_url(expanded):
                urls.append(expanded)
            else:
                path = Path(expanded).expanduser()
                urls.append(str(path if path.is_absolute() else root / path))
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shard")
    return urls


def epoch_shards(
    urls: list[str], seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """The shards worker `worker` of rank `rank` reads in `epoch`, in reading order."""
    order = list(urls)
    random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    return order[rank::world_size][worker::num_workers]


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
class SampleDecoder:
    """Raw webdataset sample (dict of bytes) -> (key, image (3, R, R) in [-1, 1], caption, shard url)."""

    resolution: int
    image_extensions: tuple[str, ...]
    caption_key: str

    def __call__(self, sample: dict[str, Any]) -> tuple[str, torch.Tensor, str, str]:
        key = sample["__key__"]
        extension = next((ext for ext in self.image_extensions if ext in sample), None)
        if extension is None:
            raise KeyError(
                f"sample {key!r} in {sample.get('__url__')} has no image with extension in "
                f"{list(self.image_extensions)} (it has {sorted(k for k in sample if not k.startswith('__'))})"
            )
        if self.caption_key not in sample:
            raise KeyError(f"sample {key!r} in {sample.get('__url__')} has no caption {self.caption_key!r}")
        image = image_bytes_to_tensor(sample[extension], self.resolution)
        return key, image, decode_caption(sample[self.caption_key]), str(sample.get("__url__", ""))


def collate(decoded: list[tuple[str, torch.Tensor, str, str]]) -> dict[str, Any]:
    return {
        "images": torch.stack([image for _, image, _, _ in decoded]),  # (B, 3, R, R)
        "captions": [caption for _, _, caption, _ in decoded],
        "keys": [key for key, _, _, _ in decoded],
        # Keys are only unique within a dataset; (url, key) names a sample anywhere.
        "urls": [url for _, _, _, url in decoded],
    }


def _open_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    return tarfile_samples({"url": url} for url in urls)


class TrainShardStream(IterableDataset):
    """One rank's training batches; each `iter()` streams the next epoch (see the module docstring).

    Batches are dicts {"images", "captions", "keys", "urls", "epoch"}; `TrainBatches` removes "epoch".
    """

    def __init__(
        self,
        urls: list[str],
        decoder: SampleDecoder,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        first_epoch: int,
        rank: int,
        world_size: int,
    ):
        super().__init__()
        self.urls = urls
        self.decoder = decoder
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.first_epoch = first_epoch
        self.rank = rank
        self.world_size = world_size
        self.iterations = 0  # on this copy: in a worker, the worker's own count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.first_epoch + self.iterations
        self.iterations += 1
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = epoch_shards(self.urls, self.seed, epoch, self.rank, self.world_size, worker, num_workers)
        rng = random.Random(derive_seed("samples", self.seed, epoch, self.rank, worker))
        pending = []
        for sample in buffered_shuffle(_open_samples(shards), self.shuffle_buffer, rng):
            pending.append(self.decoder(sample))
            if len(pending) == self.batch_size:
                yield {**collate(pending), "epoch": epoch}
                pending = []
        # partial=False: the last partial batch of this worker's epoch is dropped.


class ValShardStream(IterableDataset):
    """Validation batches: shards in the given order, no shuffle, at most `max_batches` (last may be partial)."""

    def __init__(self, urls: list[str], decoder: SampleDecoder, batch_size: int, max_batches: int):
        super().__init__()
        self.urls = urls
        self.decoder = decoder
        self.batch_size = batch_size
        self.max_batches = max_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        produced = 0
        pending = []
        if self.max_batches <= 0:
            return
        for sample in _open_samples(self.urls):
            pending.append(self.decoder(sample))
            if len(pending) == self.batch_size:
                yield collate(pending)
                produced += 1
                pending = []
                if produced == self.max_batches:
                    return
        if pending:
            yield collate(pending)


class TrainBatches:
    """The infinite training iterable `ShardDataModule.train_dataloader()` returns.

    Owns a DataLoader with persistent workers; iterates it once per epoch and keeps the
    datamodule's counters (epoch, batches in epoch, batches consumed) in step with the batches it
    hands out. Batches are counted when handed out: Lightning fetches one batch ahead, so at a
    checkpoint the count can exceed the optimizer steps by one.
    """

    def __init__(self, datamodule: "ShardDataModule", make_dataset: Callable[[int], TrainShardStream]):
        self._datamodule = datamodule
        self._make_dataset = make_dataset
        self._loader: Optional[DataLoader] = None
        self._loader_first_epoch = 0
        self._loader_iterations = 0

    def _loader_for(self, epoch: int) -> DataLoader:
        # The workers' epoch is first_epoch + (number of iter(loader) so far): rebuild if that
        # would not be `epoch` (first use, or the datamodule's state was loaded since).
        if self._loader is None or self._loader_first_epoch + self._loader_iterations != epoch:
            num_workers = self._datamodule.cfg.num_workers
            self._loader = DataLoader(
                self._make_dataset(epoch),
                batch_size=None,  # batched inside the dataset
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
                pin_memory=torch.cuda.is_available(),
            )
            self._loader_first_epoch = epoch
            self._loader_iterations = 0
        self._loader_iterations += 1
        return self._loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        counters = self._datamodule
        if counters.batches_in_epoch > 0:
            # An epoch left part-way (a previous iterator was dropped, or state was loaded from
            # mid-epoch): start the next one rather than replay this one from its beginning.
            counters.epoch += 1
            counters.batches_in_epoch = 0
        while True:
            epoch = counters.epoch
            for batch in self._loader_for(epoch):
                batch_epoch = batch.pop("epoch")
                if batch_epoch != epoch:
                    raise RuntimeError(
                        f"data worker streamed epoch {batch_epoch} while the datamodule is at epoch {epoch}: "
                        "DataLoader workers did not re-iterate once per epoch"
                    )
                counters.batches_in_epoch += 1
                counters.batches_consumed += 1
                yield batch
            if counters.batches_in_epoch == 0:
                raise RuntimeError(
                    f"epoch {epoch} gave no full batch of {counters.cfg.batch_size} on rank {counters.rank}: "
                    f"too few samples for {counters.world_size} rank(s) x {max(1, counters.cfg.num_workers)} "
                    f"worker(s) in {counters.cfg.train_shards!r}"
                )
            counters.epoch += 1
            counters.batches_in_epoch = 0


def _rank_and_world_size(trainer: Any) -> tuple[int, int]:
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardDataModule(lightning.LightningDataModule):
    """Training and validation batches from webdataset shards, as `DataConfig` describes.

    Batches: {"images": float32 (B, 3, R, R) in [-1, 1], "captions": list[str], "keys": list[str],
    "urls": list[str] (the shard each sample came from)}.

    State (`state_dict`): epoch, batches consumed in it and in total, plus what fixes the stream
    (seed, batch size, workers, world size, shards). Loading it today resumes at the start of the
    next epoch when the saved one was part-way (no exact resume yet). Exact resume can be added
    without changing the format: the stream is a pure function of the recorded values, so each
    worker can skip its share of `batches_in_epoch` (DataLoader hands out batches round-robin over
    workers) before yielding, refusing a state whose topology differs.
    """

    def __init__(self, cfg: DataConfig, seed: int):
        super().__init__()
        problems = [
            f"data.{name} must be {bound}, got {getattr(cfg, name)}"
            for name, bound, ok in (
                ("resolution", "> 0", cfg.resolution > 0),
                ("batch_size", "> 0", cfg.batch_size > 0),
                ("num_workers", ">= 0", cfg.num_workers >= 0),
                ("shuffle_buffer", ">= 0", cfg.shuffle_buffer >= 0),
                ("val_batches", ">= 0", cfg.val_batches >= 0),
                ("latent_cache_max_samples", "> 0", cfg.latent_cache_max_samples > 0),
            )
            if not ok
        ]
        if problems:
            raise ValueError("invalid data config:\n  " + "\n  ".join(problems))
        self.cfg = cfg
        self.seed = int(seed)
        self.decoder = SampleDecoder(cfg.resolution, tuple(parse_extensions(cfg.image_key)), cfg.caption_key)
        self.train_urls = resolve_shard_urls(cfg.train_shards)
        self.val_urls = resolve_shard_urls(cfg.val_shards) if cfg.val_shards else []
        self.epoch = 0
        self.batches_in_epoch = 0
        self.batches_consumed = 0
        self.rank, self.world_size = 0, 1

    @staticmethod
    def _check_local(urls: list[str], what: str) -> None:
        missing = [url for url in urls if not _is_url(url) and not Path(url).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(urls)} {what} shard(s) missing, first {missing[0]}; the shapes "
                "dataset is made by `python -m sd3train.tools.make_shapes --out data/shapes`"
            )

    def setup(self, stage: Optional[str] = None) -> None:
        self._check_local(self.train_urls, "train")
        self._check_local(self.val_urls, "val")

    def train_dataloader(self) -> TrainBatches:
        self._check_local(self.train_urls, "train")
        self.rank, self.world_size = _rank_and_world_size(self.trainer)
        if len(self.train_urls) < self.world_size:
            raise ValueError(
                f"{len(self.train_urls)} train shard(s) cannot feed {self.world_size} ranks: "
                "every rank needs at least one shard"
            )

        def make_dataset(first_epoch: int) -> TrainShardStream:
            return TrainShardStream(
                self.train_urls,
                self.decoder,
                self.cfg.batch_size,
                self.cfg.shuffle_buffer,
                self.seed,
                first_epoch,
                self.rank,
                self.world_size,
            )

        return TrainBatches(self, make_dataset)

    def val_dataloader(self) -> DataLoader | list:
        """Fixed-order batches, the same on every rank; `[]` (no validation) without val shards."""
        if not self.val_urls or self.cfg.val_batches == 0:
            return []
        self._check_local(self.val_urls, "val")
        # In the main process: a couple of batches, and the order must not depend on workers.
        return DataLoader(
            ValShardStream(self.val_urls, self.decoder, self.cfg.batch_size, self.cfg.val_batches),
            batch_size=None,
            num_workers=0,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "batches_consumed": self.batches_consumed,
            "batch_size": self.cfg.batch_size,
            "num_workers": self.cfg.num_workers,
            "world_size": self.world_size,
            "train_shards": self.cfg.train_shards,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(
                f"data state version {state_dict.get('version')!r} is not {STATE_VERSION}: "
                "the checkpoint comes from another sd3train data format"
            )
        missing = [key for key in ("epoch", "batches_in_epoch", "batches_consumed") if key not in state_dict]
        if missing:
            raise KeyError(f"data state lacks {missing}")
        self.epoch = int(state_dict["epoch"])
        self.batches_in_epoch = int(state_dict["batches_in_epoch"])
        self.batches_consumed = int(state_dict["batches_consumed"])
