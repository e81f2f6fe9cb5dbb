"""Where one rank's training stream stands: what training consumed of it, so a resume continues it exactly.

    position = StreamPosition(num_workers=2, skip_budget=0.05, skip_budget_min_samples=1000)
    batch = position.consume(batch)            # as a batch reaches the training step (drops its DATA_KEY)
    epoch, replays = position.resume_point()   # where each worker's stream picks up
    state = position.state_dict()              # this rank's part of the datamodule's checkpoint state

A batch counts when it is consumed, not when the loader prefetched it. Kept per epoch: per worker
the batches consumed in it, the (url, key) of samples that failed to decode and a digest of its last
consumed batch, and the worker whose batch came last; across epochs: the running totals and the
skip ledger, whose budget is checked as batches are consumed. A worker's counts after its last batch
of an epoch (its tail) arrive before that batch is consumed and wait for it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from sd3train.data.skips import SkipLedger
from sd3train.data.stream import DATA_KEY, Replay, keys_digest


class StreamPosition:
    """One rank's consumption cursor and skip ledger; see the module docstring."""

    def __init__(self, num_workers: int, skip_budget: float, skip_budget_min_samples: int):
        self.workers = max(1, num_workers)  # the main process streams when there are no workers
        self.skip_budget = skip_budget
        self.skip_budget_min_samples = skip_budget_min_samples
        self.start_epoch(0)
        self.batches_consumed = 0
        self.samples_consumed = 0
        self.ledger = SkipLedger("rank 0")
        self._tails: dict[tuple[int, int], dict[str, Any]] = {}  # see record_tail
        self._tails_counted: set[tuple[int, int]] = set()
        self._resume_epoch: Optional[int] = None

    def start_epoch(self, epoch: int) -> None:
        """Begin `epoch` with nothing consumed in it (the running totals and the ledger stay)."""
        self.epoch = epoch
        self.consumed_in_epoch = [0] * self.workers
        self.failed: list[list[tuple[str, str]]] = [[] for _ in range(self.workers)]
        self.last_keys: list[Optional[str]] = [None] * self.workers  # digest of each worker's last consumed batch
        self.last_worker: Optional[int] = None

    @property
    def batches_in_epoch(self) -> int:
        return sum(self.consumed_in_epoch)

    @property
    def skipped(self) -> Counter:
        return self.ledger.reasons

    def _count(self, report: dict[str, Any], final: bool = False) -> None:
        self.ledger.add(report)
        self.ledger.check_budget(self.skip_budget, self.skip_budget_min_samples, final=final)

    def consume(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Record that `batch` reaches training; returns it without its bookkeeping."""
        cursor = batch.pop(DATA_KEY, None)
        if cursor is None:
            return batch
        if cursor["epoch"] != self.epoch:
            for key in [key for key in self._tails if key[0] < cursor["epoch"]]:
                self._count(self._tails.pop(key))  # the old epoch's last counts, had they not been applied
            self.start_epoch(cursor["epoch"])
        worker = cursor["worker"]
        self.consumed_in_epoch[worker] = cursor["index"]
        self.failed[worker].extend(tuple(pair) for pair in cursor["failed"])
        self.last_keys[worker] = keys_digest(batch["keys"])
        self.last_worker = worker
        self.batches_consumed += 1
        self.samples_consumed += len(batch["keys"])
        self._count(cursor)
        tail = self._tails.get((cursor["epoch"], worker))
        if tail is not None and tail["index"] == cursor["index"]:
            self._apply_tail(self._tails.pop((cursor["epoch"], worker)))
        return batch

    def _apply_tail(self, cursor: dict[str, Any]) -> None:
        self._tails_counted.add((cursor["epoch"], cursor["worker"]))
        self._count(cursor, final=True)

    def record_tail(self, cursor: dict[str, Any]) -> None:
        """A worker's counts after its last batch of an epoch: applied once that batch is consumed
        (a resumed worker does not send them again once they were)."""
        worker = cursor["worker"]
        consumed = self.consumed_in_epoch[worker] if cursor["epoch"] == self.epoch else 0
        if cursor["index"] == 0 or (cursor["epoch"] == self.epoch and consumed >= cursor["index"]):
            self._apply_tail(cursor)
        else:
            self._tails[(cursor["epoch"], worker)] = cursor

    def resume_point(self) -> tuple[int, dict[int, Replay]]:
        """The epoch to stream next and, for a part-way epoch, where each worker picks up. A part-way
        epoch is remembered for `resumed_mid_epoch`: the stream asks this once, when it starts."""
        counted = {worker for epoch, worker in self._tails_counted if epoch == self.epoch}
        if not any(self.consumed_in_epoch) and not counted:
            return self.epoch, {}
        self._resume_epoch = self.epoch
        replays = {
            worker: Replay(
                skip_batches=self.consumed_in_epoch[worker],
                failed=frozenset(self.failed[worker]),
                # Workers up to the last one served have had their turn in this round-robin cycle.
                placeholder=self.last_worker is not None and worker <= self.last_worker,
                last_keys=self.last_keys[worker],
                tail_counted=worker in counted,
            )
            for worker in range(len(self.consumed_in_epoch))
        }
        return self.epoch, replays

    def resumed_mid_epoch(self, epoch: int) -> bool:
        """Whether `epoch` was picked up part-way (it may then have no batch left to give)."""
        return self._resume_epoch == epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed_in_epoch": list(self.consumed_in_epoch),
            "failed": [[list(pair) for pair in pairs] for pairs in self.failed],
            "last_keys": list(self.last_keys),
            "last_worker": self.last_worker,
            "tails_counted": sorted(worker for epoch, worker in self._tails_counted if epoch == self.epoch),
            "batches_consumed": self.batches_consumed,
            "samples_consumed": self.samples_consumed,
            "ledger": self.ledger.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], resplit_epoch: Optional[int] = None) -> None:
        """Continue where `state` (a `state_dict()`) stands; with `resplit_epoch` (the stream's topology or
        settings changed) keep only the totals and the ledger, and start that epoch afresh."""
        if resplit_epoch is not None:
            self.start_epoch(resplit_epoch)
        else:
            self.start_epoch(state["epoch"])
            self.consumed_in_epoch = list(state["consumed_in_epoch"])
            self.failed = [[tuple(pair) for pair in pairs] for pairs in state["failed"]]
            self.last_keys = list(state["last_keys"])
            self.last_worker = state["last_worker"]
            self._tails_counted = {(self.epoch, worker) for worker in state["tails_counted"]}
        self.batches_consumed = int(state["batches_consumed"])
        self.samples_consumed = int(state["samples_consumed"])
        self.ledger.load_state_dict(state["ledger"])
