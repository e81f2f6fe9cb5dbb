"""Reading what W&B wrote offline: the records of a `.wandb` file and its history rows.

    for step, row in history_rows(run_dir / "wandb" / "offline-run-..." / "run-ID.wandb"):
        row["train/loss"]   # the value as W&B stored it (JSON text)
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of an offline `.wandb` file: a ":W&B" header, then LevelDB-style log blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:  # a whole record
            yield chunk
        elif kind == 2:  # first, middle and last pieces of a long one
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def history_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(W&B step, {metric: JSON value}) for each history record, in order."""
    rows = []
    for raw in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.HasField("history"):
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            rows.append((record.history.step.num, items))
    return rows
