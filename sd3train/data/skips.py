"""Bad data: samples skipped per reason, a rate-limited log, and the budget that stops a run.

A skipped sample never stops training by itself; too many do. The stream position
(sd3train/data/position.py) keeps one `SkipLedger` per rank, fed by the workers' reports as batches
are consumed; its `check_budget` raises `DataBudgetError` (naming the budget and the shard with
most skips) when the bad fraction of the samples that rank read passes `data.skip_budget`, or the
fraction of shards that could not be read to the end does. Blocklisted keys are counted but are not "bad".
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Optional

LOG = logging.getLogger("sd3train.data")

DECODE_ERROR = "decode_error"  # the image (or cache entry) does not decode
NO_IMAGE = "no_image"
NO_CAPTION = "no_caption"
TOO_SMALL = "too_small"  # shorter side under data.min_size
TRUNCATED_SHARD = "truncated_shard"  # the rest of the shard is lost; counted once
UNREADABLE_SHARD = "unreadable_shard"
DUPLICATE_KEY = "duplicate_key"
BLOCKLISTED = "blocklisted"
REASONS = (DECODE_ERROR, NO_IMAGE, NO_CAPTION, TOO_SMALL, TRUNCATED_SHARD, UNREADABLE_SHARD, DUPLICATE_KEY, BLOCKLISTED)
NOT_BAD = (BLOCKLISTED,)  # deliberate leave-outs: outside the budget

# The first few skips of each reason are logged, then only the 10th, 100th, 1000th, ...
LOG_FIRST = 5


class DataBudgetError(RuntimeError):
    """Too large a fraction of the data is bad: the run stops rather than train on what is left."""


# A lost shard (unreadable, or truncated) counts once among the samples; the share of lost shards
# has a budget of its own (data.skip_budget), checked once this many shards were opened.
SHARD_BUDGET_MIN_SHARDS = 20

_logged: Counter[str] = Counter()  # per process: rate-limits the log lines of each reason


def reset_skip_log() -> None:
    """Start the rate limit of the skip log lines afresh (tests)."""
    _logged.clear()


def _should_log(count: int) -> bool:
    if count <= LOG_FIRST:
        return True
    while count % 10 == 0:
        count //= 10
    return count == 1


def log_skip(reason: str, url: str, key: Optional[str], detail: str = "", log: bool = True) -> None:
    """One warning line for a skipped sample, rate-limited per reason in this process."""
    if reason not in REASONS:
        raise ValueError(f"unknown skip reason {reason!r}")
    if not log or reason in NOT_BAD:
        return
    _logged[reason] += 1
    if _should_log(_logged[reason]):
        LOG.warning("skipped sample (%s, %d so far in this process): shard %s key %s%s",
                    reason, _logged[reason], url, key, f": {detail}" if detail else "")


class SkipLedger:
    """Samples read and skipped (per reason and per shard) on one rank, from the workers' reports."""

    def __init__(self, where: str = ""):
        self.where = where  # e.g. "rank 0", for messages
        self.read = 0
        self.reasons: Counter[str] = Counter()
        self.by_shard: Counter[str] = Counter()
        self.shards_opened = 0
        self.shards_lost = 0

    def add(self, report: dict) -> None:
        self.read += report["read"]
        self.reasons.update(report["skipped"])
        self.by_shard.update(report.get("bad_by_shard", {}))
        self.shards_opened += report.get("shards_opened", 0)
        self.shards_lost += report.get("shards_lost", 0)

    @property
    def bad(self) -> int:
        return sum(count for reason, count in self.reasons.items() if reason not in NOT_BAD)

    def _reasons(self) -> str:
        return ", ".join(f"{reason} {count}" for reason, count in sorted(self.reasons.items()))

    def check_budget(self, budget: float, min_samples: int, final: bool = False) -> None:
        """Raise DataBudgetError when bad / read > budget (once `min_samples` were read, or when
        `final` and nothing read was usable), or when the share of lost shards is over it."""
        where = f" on {self.where}" if self.where else ""
        fraction = self.bad / max(1, self.read)
        if self.read and fraction > budget and (self.read >= min_samples or (final and self.bad == self.read)):
            worst, worst_count = self.by_shard.most_common(1)[0]
            raise DataBudgetError(
                f"{self.bad} of {self.read} samples read ({fraction:.2%}) were bad{where}, over the "
                f"data.skip_budget of {budget:.2%} ({self._reasons()}); the worst shard is {worst} with "
                f"{worst_count} skipped. Fix or drop the bad shards, or raise data.skip_budget."
            )
        lost = self.shards_lost / max(1, self.shards_opened)
        if self.shards_opened >= SHARD_BUDGET_MIN_SHARDS and lost > budget:
            worst, worst_count = self.by_shard.most_common(1)[0]
            raise DataBudgetError(
                f"{self.shards_lost} of {self.shards_opened} shards opened ({lost:.2%}) could not be read to the "
                f"end{where}, over the data.skip_budget of {budget:.2%} ({self._reasons()}); the worst shard is "
                f"{worst} with {worst_count} skipped. Check the shard paths or the storage."
            )

    def state_dict(self) -> dict:
        return {"read": self.read, "reasons": dict(self.reasons), "by_shard": dict(self.by_shard),
                "shards_opened": self.shards_opened, "shards_lost": self.shards_lost}

    def load_state_dict(self, state: dict) -> None:
        self.read = int(state["read"])
        self.reasons = Counter(state["reasons"])
        self.by_shard = Counter(state["by_shard"])
        self.shards_opened = int(state["shards_opened"])
        self.shards_lost = int(state["shards_lost"])


def load_blocklist(path: str | Path) -> frozenset[str]:
    """Keys to leave out: one per line; blank lines and lines starting with '#' are ignored."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"data.blocklist: {path} does not exist") from None
    return frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
