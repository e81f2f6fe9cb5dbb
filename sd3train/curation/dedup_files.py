"""The files sd3train-dedup writes, each complete or absent (sd3train/durable.py), with bytes fixed by their content.

    write_arrays(path, {"keys": keys, "descriptors": vectors, "descriptor": np.array(name)})
    arrays = read_arrays(path)                  # dict of numpy arrays (np.load of an .npz)
    (text files and PNGs: durable.write_text_atomic / write_bytes_atomic)

Layout of an output folder OUT:
    OUT/embeddings/<shard>.npz   per input shard (`<shard>` = its tar name without `.tar`): `keys`
                                 (N,) str, `descriptors` (N, D) float32 unit rows, `descriptor` the
                                 descriptor's name with its settings
    OUT/clusters.npz             `centroids` (K, D), `assignment` (N,) int32 over all samples in
                                 shard order, `shards` and `counts` (which embeddings, how many each),
                                 `descriptor`, `clusters_requested`, `seed`, `train_samples`
    OUT/blocklist.txt            keys to leave out, sorted, one per line (data.blocklist=...)
    OUT/groups.txt               every group, one per line: its keys sorted (the kept one first)
    OUT/report.json              counts, histogram, settings, example groups
    OUT/examples/group-NNN.png   image grids of a few groups (the kept image first)

`.npz` files are written member by member with a fixed zip timestamp and no compression (numpy's
own savez stamps the current time), so equal arrays give equal bytes.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from sd3train.durable import write_bytes_atomic

EMBEDDINGS_DIR = "embeddings"
CLUSTERS_NAME = "clusters.npz"
BLOCKLIST_NAME = "blocklist.txt"
GROUPS_NAME = "groups.txt"
REPORT_NAME = "report.json"
EXAMPLES_DIR = "examples"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip header can hold


def embedding_name(shard_name: str) -> str:
    """`00001.tar` -> `00001.npz`."""
    return shard_name[: -len(".tar")] + ".npz"


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz archive of `arrays` (in the order given) whose bytes depend on the arrays alone."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_bytes_atomic(path, npz_bytes(arrays))


def read_arrays(path: Path, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz (only `names`, when given: np.load reads members lazily)."""
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in (names if names is not None else archive.files)}
