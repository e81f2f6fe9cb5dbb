"""Streaming webdataset shards into training and validation batches, with sample-exact resume.

    from sd3train.config.schema import DataConfig
    from sd3train.data.datamodule import ShardDataModule
    datamodule = ShardDataModule(DataConfig(), seed=0)   # needs `python -m sd3train.tools.make_shapes --out data/shapes`
    batch = next(iter(datamodule.train_dataloader()))
    # {"images": (B, 3, h, w) in [-1, 1], "captions", "keys", "urls", "original_sizes" (B, 2),
    #  "crop_offsets" (B, 2), "synthetic_captions", "flipped"}  (cached shards: see cache_format.py)

How each worker's stream is made is in `sd3train/data/stream.py`; which shards it reads in
`sources.py`; the DataLoader side in `loaders.py`. The training stream is infinite (training is
step-based).

State: this rank's `StreamPosition` (`position.py`): what was *consumed* (a batch counts when
Lightning hands it to the step, through `on_before_batch_transfer`, not when the loader prefetched
it) and the skip ledger. `state_dict()` gathers every rank's position (it is called on all ranks when
Lightning checkpoints); `load_state_dict` keeps this rank's, and `train_dataloader()` resumes each
worker exactly where its consumed batches end. A different world size, worker count or stream
setting is refused, naming what changed, unless `data.resume_resplit=true`.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Optional

import lightning
import torch
from torch.utils.data import DataLoader

from sd3train.data.builders import build_captions, build_decoder, build_plan
from sd3train.data.loaders import TrainBatches, TrainShardStream, ValShardStream
from sd3train.data.position import StreamPosition
from sd3train.data.skips import LOG, REASONS, load_blocklist
from sd3train.data.sources import missing_local_shards, resolve_shard_urls
from sd3train.data.stream import Replay, StreamSpec, keys_digest
from sd3train.paths import REPO_ROOT, resolve_repo_path

if TYPE_CHECKING:
    from sd3train.config.schema import DataConfig

__all__ = ["REPO_ROOT", "ShardDataModule", "resolve_shard_urls", "build_decoder", "build_plan"]

STATE_VERSION = 3
# Settings the stream is a function of: resuming under other values would not continue it.
STREAM_FIELDS = (
    "shards", "sources", "resolution", "aspect_buckets", "bucket_step", "max_aspect_ratio", "random_crop",
    "random_flip", "min_size", "batch_size", "num_workers", "shuffle_buffer", "resampled", "shards_per_epoch",
    "drop_partial_batches", "image_key", "caption_key", "synthetic_caption_key", "synthetic_captions", "p_synthetic",
    "blocklist", "cached",
)


def _rank_and_world_size(trainer: Any) -> tuple[int, int]:
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardDataModule(lightning.LightningDataModule):
    """Training and validation batches from webdataset shards, as `DataConfig` describes."""

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
                ("p_synthetic", "in [0, 1]", 0.0 <= cfg.p_synthetic <= 1.0),
                ("skip_budget", "in [0, 1]", 0.0 <= cfg.skip_budget <= 1.0),
            )
            if not ok
        ]
        if problems:
            raise ValueError("invalid data config:\n  " + "\n  ".join(problems))
        self.cfg = cfg
        self.seed = int(seed)
        self.plan = build_plan(cfg, self.seed)
        self.decoder = build_decoder(cfg, self.seed, train=True)
        self.val_decoder = build_decoder(cfg, self.seed, train=False)
        self.captions = build_captions(cfg)
        self.val_urls = resolve_shard_urls(cfg.val_shards) if cfg.val_shards else []
        self.rank, self.world_size = 0, 1
        self.position = StreamPosition(cfg.num_workers, cfg.skip_budget, cfg.skip_budget_min_samples)
        self.train_batches: Optional[TrainBatches] = None  # the iterable train_dataloader() last returned
        self._shards_checked = False
        self._blocklist_keys: Optional[frozenset[str]] = None
        self._loaded: Optional[dict[str, Any]] = None  # a loaded state, applied in train_dataloader
        # Applied to every batch on the host before it moves to the device (the training module's
        # tokenizer: token ids then travel with the batch).
        self.prepare_batch: Optional[Callable[[dict], dict]] = None

    # ------------------------------ position (read-only views of self.position)
    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def batches_in_epoch(self) -> int:
        return self.position.batches_in_epoch

    @property
    def batches_consumed(self) -> int:
        return self.position.batches_consumed

    @property
    def skipped(self) -> Counter:
        return self.position.skipped

    @property
    def samples_read(self) -> int:
        return self.position.ledger.read

    @property
    def shard_spec(self) -> str:
        return " + ".join(f"{s.shards} (weight {s.weight})" for s in self.cfg.sources) if self.cfg.sources else self.cfg.shards

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict):
            return batch
        batch = self.position.consume(batch)
        return self.prepare_batch(batch) if self.prepare_batch is not None else batch

    # -------------------------------------------------------------- dataloaders
    def _check_local(self, urls: list[str], what: str) -> None:
        missing = missing_local_shards(urls)
        if missing:
            shapes = str(REPO_ROOT / "data" / "shapes") in missing[0]
            hint = ("; the shapes dataset is made by `python -m sd3train.tools.make_shapes --out data/shapes`"
                    if shapes else f"; check data.{'val_shards' if what == 'val' else 'shards'}")
            raise FileNotFoundError(f"{len(missing)} of {len(urls)} {what} shard(s) missing, first {missing[0]}{hint}")

    def setup(self, stage: Optional[str] = None) -> None:
        # Once per datamodule: fit() checks before building the models, then Lightning and
        # train_dataloader() call this again (a stat per shard is not free with 100k shards).
        if self._shards_checked:
            return
        for source in self.plan.sources:
            self._check_local(list(source.urls), "train")
        self._check_local(self.val_urls, "val")
        if self.captions is not None:
            urls = [url for source in self.plan.sources for url in source.urls]
            missing = self.captions.missing(urls)
            if missing:
                LOG.warning("%d of %d train shard(s) have no caption table in %s (first %s): their samples keep "
                            "their own captions", len(missing), len(urls), self.captions.folder, missing[0])
        self._shards_checked = True

    def train_dataloader(self) -> TrainBatches:
        self.setup()
        self.rank, self.world_size = _rank_and_world_size(self.trainer)
        if not self.plan.resampled and self.plan.num_shards < self.world_size:
            raise ValueError(
                f"{self.plan.num_shards} train shard(s) cannot feed {self.world_size} ranks: "
                "every rank needs at least one shard (or set data.resampled=true)"
            )
        self.position.ledger.where = f"rank {self.rank}"
        if self._loaded is not None:
            self._apply_loaded(self._loaded)
            self._loaded = None
        blocklist = self._blocklist()
        spec = StreamSpec(
            plan=self.plan, decoder=self.decoder, batch_size=self.cfg.batch_size,
            shuffle_buffer=self.cfg.shuffle_buffer, seed=self.seed, blocklist=blocklist,
            drop_partial=self.cfg.drop_partial_batches, captions=self.captions,
        )

        rank, world_size = self.rank, self.world_size  # not `self` in the closure: no reference cycle

        def make_dataset(first_epoch: int, replays: dict[int, Replay]) -> TrainShardStream:
            return TrainShardStream(spec, first_epoch, rank, world_size, replays)

        self.train_batches = TrainBatches(
            self.position, make_dataset, num_workers=self.cfg.num_workers, consume_when_handed_out=self.trainer is None,
            describe=f"of {self.cfg.batch_size} on rank {rank}: too few usable samples for {world_size} rank(s) x "
                     f"{max(1, self.cfg.num_workers)} worker(s) in {self.shard_spec!r}",
        )
        return self.train_batches

    def _blocklist(self) -> frozenset[str]:
        """Read once: the stream and every checkpoint's state (its digest) need it."""
        if self._blocklist_keys is None:
            self._blocklist_keys = (
                load_blocklist(resolve_repo_path(self.cfg.blocklist)) if self.cfg.blocklist else frozenset()
            )
        return self._blocklist_keys

    def teardown(self, stage: Optional[str] = None) -> None:
        if self.train_batches is not None:
            self.train_batches.shutdown()

    def val_dataloader(self) -> DataLoader | list:
        """Fixed-order batches, the same on every rank; `[]` (no validation) without val shards."""
        if not self.val_urls or self.cfg.val_batches == 0:
            return []
        self._check_local(self.val_urls, "val")
        # In the main process: a couple of batches, and the order must not depend on workers.
        return DataLoader(
            ValShardStream(self.val_urls, self.val_decoder, self.cfg.batch_size, self.cfg.val_batches),
            batch_size=None,
            num_workers=0,
        )

    # -------------------------------------------------------------------- state
    def _stream_settings(self) -> dict[str, Any]:
        settings = {name: _plain(getattr(self.cfg, name)) for name in STREAM_FIELDS}
        blocklist = self._blocklist()
        settings["blocklist_digest"] = keys_digest(sorted(blocklist)) if blocklist else None
        return settings

    def state_dict(self) -> dict[str, Any]:
        ranks = [self.position.state_dict()]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, self.position.state_dict())
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "world_size": len(ranks),
            "stream": self._stream_settings(),
            "ranks": ranks,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(
                f"data state version {state_dict.get('version')!r} is not {STATE_VERSION}: "
                "the checkpoint comes from another sd3train data format"
            )
        missing = [key for key in ("seed", "world_size", "stream", "ranks") if key not in state_dict]
        if missing:
            raise KeyError(f"data state lacks {missing}")
        self._loaded = state_dict
        # Without a trainer (tools, tests) the rank is known now; under one, at train_dataloader().
        if self.trainer is None:
            self.rank, self.world_size = _rank_and_world_size(None)
            self._apply_loaded(state_dict)
            self._loaded = None

    def _apply_loaded(self, state: dict[str, Any]) -> None:
        changes = []
        if state["seed"] != self.seed:
            changes.append(f"trainer.seed: checkpoint {state['seed']}, now {self.seed}")
        if state["world_size"] != self.world_size:
            changes.append(f"world size: checkpoint {state['world_size']} rank(s), now {self.world_size}")
        now = self._stream_settings()
        for name, saved in state["stream"].items():
            if saved != now.get(name):
                label = "the blocklist's content" if name == "blocklist_digest" else f"data.{name}"
                changes.append(f"{label}: checkpoint {saved!r}, now {now.get(name)!r}")
        ranks = state["ranks"]
        mine = ranks[self.rank] if self.rank < len(ranks) else ranks[0]
        if changes:
            if not self.cfg.resume_resplit:
                raise ValueError(
                    "cannot resume the data stream exactly; the checkpoint's stream differs:\n  "
                    + "\n  ".join(changes)
                    + "\nResume with the same settings, or set data.resume_resplit=true to start the next "
                    "epoch split over the new topology (no sample-exact continuation)."
                )
            # Statistical re-split: every rank starts the epoch after the newest one any rank reached.
            self.position.load_state_dict(mine, resplit_epoch=max(rank["epoch"] for rank in ranks) + 1)
        else:
            self.position.load_state_dict(mine)

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, float]:
        """This rank's data counters for logging: data/skipped_<reason>, data/skipped_fraction, ..."""
        metrics = {f"data/skipped_{reason}": float(self.skipped.get(reason, 0)) for reason in REASONS}
        metrics["data/samples_read"] = float(self.samples_read)
        return metrics

    def skipped_fraction(self) -> float:
        """Bad samples (blocklisted ones are not) over samples read, on this rank."""
        return self.position.ledger.bad / max(1, self.samples_read)


def _plain(value: Any) -> Any:
    """Config values as plain JSON-like data (dataclasses in lists become dicts)."""
    import dataclasses

    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
