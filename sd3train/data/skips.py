"""Bad data: samples skipped per reason, a rate-limited log, and the budget that stops a run.

A skipped sample never stops training by itself; too many do. `SkipLedger.check_budget` raises
`DataBudgetError` (naming the budget and the shard with most skips) when the bad fraction of the
samples read passes `data.skip_budget`. Blocklisted keys are counted but are not "bad".
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


def _should_log(count: int) -> bool:
    if count <= LOG_FIRST:
        return True
    while count % 10 == 0:
        count //= 10
    return count == 1


class SkipLedger:
    """Counts of samples read and skipped (per reason and per shard) in one stream."""

    def __init__(self, where: str = ""):
        self.where = where  # e.g. "rank 0 worker 1", for log lines
        self.read = 0
        self.reasons: Counter[str] = Counter()
        self.by_shard: Counter[str] = Counter()

    def count_read(self) -> None:
        self.read += 1

    def skip(self, reason: str, url: str, key: Optional[str], detail: str = "", log: bool = True) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.reasons[reason] += 1
        if reason not in NOT_BAD:
            self.by_shard[url] += 1
        if log and _should_log(self.reasons[reason]):
            LOG.warning(
                "skipped sample (%s, %d so far%s): shard %s key %s%s",
                reason, self.reasons[reason], f", {self.where}" if self.where else "", url, key,
                f": {detail}" if detail else "",
            )

    @property
    def bad(self) -> int:
        return sum(count for reason, count in self.reasons.items() if reason not in NOT_BAD)

    def check_budget(self, budget: float, min_samples: int, final: bool = False) -> None:
        """Raise DataBudgetError when bad / read > budget (once `min_samples` were read, or `final`)."""
        if self.read == 0 or (self.read < min_samples and not final):
            return
        fraction = self.bad / max(1, self.read)
        if fraction <= budget:
            return
        worst, worst_count = self.by_shard.most_common(1)[0]
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.reasons.items()))
        raise DataBudgetError(
            f"{self.bad} of {self.read} samples read ({fraction:.1%}) were bad{f' in {self.where}' if self.where else ''}, "
            f"over the data.skip_budget of {budget:.1%} ({reasons}); the worst shard is {worst} "
            f"with {worst_count} skipped. Fix or drop the bad shards, or raise data.skip_budget."
        )


def load_blocklist(path: str | Path) -> frozenset[str]:
    """Keys to leave out: one per line; blank lines and lines starting with '#' are ignored."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"data.blocklist: {path} does not exist") from None
    return frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
