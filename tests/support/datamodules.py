"""Reading a whole epoch from a ShardDataModule, as the blocklist, dedup and curation-flow tests do."""

from __future__ import annotations

from collections import Counter


def one_epoch_keys(datamodule) -> tuple[list[str], Counter]:
    """Keys of a ShardDataModule's epoch 0 and the skip counts its batches carried (stops at epoch
    1's first batch); the datamodule is torn down after, as Lightning does after fit."""
    keys: list[str] = []
    skipped = Counter()
    try:
        for batch in datamodule.train_dataloader():
            if datamodule.epoch != 0:
                break
            keys += batch["keys"]
            skipped = Counter(datamodule.skipped)
    finally:
        datamodule.teardown("fit")  # the persistent workers stop now
    return keys, skipped
