"""The stages of sd3train-dedup on an output folder: embed (per task), cluster, search (command line: dedup.py).

    code = embed_stage(shards, out, descriptor_settings, batch_size, threads, task_index, num_tasks)
    cluster_stage(shards, out, clusters=16000, train_samples=1_000_000, seed=0)
    search_stage(shards, out, threshold=None, probe=1, examples=8)

Each returns an exit status (0, or 1 when some shards could not be read) or raises UsageError.
File layout: dedup_files.py.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd3train.curation.dedup_files import (
    BLOCKLIST_NAME,
    CLUSTERS_NAME,
    EMBEDDINGS_DIR,
    EXAMPLES_DIR,
    GROUPS_NAME,
    REPORT_NAME,
    embedding_name,
    npz_bytes,
    read_arrays,
    write_arrays,
)
from sd3train.curation.tasks import ShardTally, UsageError, assigned, output_name, pick_device
from sd3train.durable import remove_leftovers, replace, sync, temporary_file

PROG = "sd3train-dedup"
FAILED_SHARDS_EXIT_CODE = 1


def log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def shard_names(spec: str) -> list[tuple[str, str]]:
    """[(url, embeddings file name)] of a shard spec, in order; UsageError naming --shards when bad."""
    from sd3train.data.sources import resolve_shard_urls

    try:
        urls = resolve_shard_urls(spec)
    except ValueError as error:
        raise UsageError(f"--shards: {error}") from None
    names = [embedding_name(output_name(url)) for url in urls]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise UsageError(f"--shards: several shards would write the same embeddings file {', '.join(repeated[:5])}; "
                         "their file names must differ")
    return list(zip(urls, names))


# ------------------------------------------------------------------- embed


@dataclass(frozen=True)
class DescriptorSettings:
    name: str  # "sscd" or "thumbnail"
    weights: str | None = None
    preprocessing: str = "small288"
    device: str = "auto"


def _descriptor(settings: DescriptorSettings):
    from sd3train.curation.descriptors import build_descriptor
    from sd3train.curation.sscd import SSCDWeightsError

    if settings.name == "sscd" and settings.weights is None:
        raise UsageError("--descriptor sscd needs --weights PATH (an SSCD TorchScript file or state dict, e.g. "
                         "sscd_disc_mixup.torchscript.pt); without weights use --descriptor thumbnail")
    device = pick_device(settings.device) if settings.name == "sscd" else "cpu"
    try:
        return build_descriptor(settings.name, settings.weights, device, settings.preprocessing), device
    except SSCDWeightsError as error:
        raise UsageError(f"--weights: {error}") from None


def embed_stage(spec: str, out: Path, settings: DescriptorSettings, batch_size: int, threads: int,
                task_index: int, num_tasks: int) -> int:
    from sd3train.curation.dedup_embed import Embedder, embeddings_arrays, embeddings_descriptor

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    shards = shard_names(spec)
    folder = out / EMBEDDINGS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    mine = assigned(shards, task_index, num_tasks)
    removed = remove_leftovers(folder, [name for _, name in mine])
    todo = [(url, name) for url, name in mine if not (folder / name).exists()]
    descriptor, device = _descriptor(settings) if todo else (None, "cpu")
    done = [name for _, name in mine if (folder / name).exists()]
    if descriptor is not None and done:
        made_with = embeddings_descriptor(folder / done[0])
        if made_with != descriptor.name:
            raise UsageError(f"{folder / done[0]} was made with descriptor {made_with}, this run uses "
                             f"{descriptor.name}: use another --out, or the same descriptor settings")
    log(f"embed, task {task_index} of {num_tasks}: {len(mine)} of {len(shards)} shard(s), {len(done)} already "
        f"done -> {folder} ({descriptor.name if descriptor else settings.name}, batch {batch_size}, {device})"
        + (f"; removed {removed} temporary file(s) of an interrupted run" if removed else ""))
    tally = ShardTally(log, total=len(todo), unit="descriptors")
    if todo:
        embedder = Embedder(descriptor, batch_size, threads)
        for url, name in todo:
            shard_start = time.perf_counter()
            # Opened now, not at the end: a killed run leaves this hidden file, which its rerun removes.
            descriptor_fd, temporary = temporary_file(folder, name)
            try:
                with os.fdopen(descriptor_fd, "wb") as stream:
                    result = embedder.run(url)
                    if result.failure is None:
                        stream.write(npz_bytes(embeddings_arrays(result, descriptor.name)))
                        sync(stream)
                if result.failure is None:
                    replace(temporary, folder / name)
            finally:
                temporary.unlink(missing_ok=True)
            tally.add(name, url, len(result.keys), result.skipped, result.examples, result.failure,
                      time.perf_counter() - shard_start)
    return tally.finish(already_done=len(done), prefix="embed ")


# ----------------------------------------------------------------- loading


def _embedding_paths(spec: str, out: Path) -> list[tuple[str, Path]]:
    """[(url, embeddings path)] for every shard; UsageError when some are missing."""
    shards = [(url, out / EMBEDDINGS_DIR / name) for url, name in shard_names(spec)]
    missing = [path.name for _, path in shards if not path.exists()]
    if missing:
        raise UsageError(f"{len(missing)} of {len(shards)} shard(s) have no embeddings in {out / EMBEDDINGS_DIR} "
                         f"(e.g. {', '.join(missing[:3])}): run `{PROG} embed` for them first")
    return shards


@dataclass
class Embeddings:
    keys: list[str]
    descriptors: np.ndarray  # (N, D) float32
    shard_urls: list[str]  # in shard order
    names: list[str]  # embeddings file per shard, in shard order
    counts: list[int]  # rows per shard
    descriptor: str

    def url_of_row(self, row: int) -> str:
        """The shard the row's sample came from."""
        return self.shard_urls[int(np.searchsorted(np.cumsum(self.counts), row, side="right"))]


def load_embeddings(spec: str, out: Path) -> Embeddings:
    """Every shard's keys and descriptors, in shard order.

    Two passes: the keys (and the descriptor name) of every file first, then the descriptors, each
    file's copied into one array allocated once: at 1e8 x 512 float32 (200 GB) the blocks and their
    concatenation must not be in memory together.
    """
    paths = _embedding_paths(spec, out)
    keys, names, counts, made_with = [], [], [], {}
    for _, path in paths:
        arrays = read_arrays(path, ("keys", "descriptor"))
        made_with.setdefault(str(arrays["descriptor"]), path.name)
        shard_keys = arrays["keys"].tolist()
        keys += shard_keys
        names.append(path.name)
        counts.append(len(shard_keys))
    if len(made_with) > 1:
        raise UsageError("the embeddings were made with different descriptors ("
                         + "; ".join(f"{name} in {path}" for name, path in made_with.items())
                         + "): embed them all with one")
    if not keys:
        raise UsageError(f"no descriptors in {out / EMBEDDINGS_DIR}: every sample was skipped")
    descriptors, first, start = None, None, 0
    for (_, path), count in zip(paths, counts):
        if count == 0:
            continue
        block = read_arrays(path, ("descriptors",))["descriptors"]  # (count, D)
        if descriptors is None and block.ndim == 2:
            descriptors, first = np.empty((len(keys), block.shape[1]), dtype=np.float32), path
        if descriptors is None or block.shape != (count, descriptors.shape[1]):
            width = descriptors.shape[1] if descriptors is not None else "D"
            raise UsageError(f"{path} holds descriptors of shape {block.shape}, expected ({count}, {width})"
                             + (f" as in {first}" if first is not None else "")
                             + ": embed every shard with one descriptor")
        descriptors[start:start + count] = block
        start += count
        del block
    return Embeddings(keys, descriptors, [url for url, _ in paths], names, counts, next(iter(made_with)))


def check_cluster_options(clusters: int, train_samples: int) -> None:
    if clusters < 1 or train_samples < 1:
        raise UsageError(f"--clusters and --train-samples must be >= 1, got {clusters} and {train_samples}")


def check_search_options(threshold: float | None, probe: int, examples: int) -> None:
    if probe < 1 or examples < 0:
        raise UsageError(f"--probe must be >= 1 and --examples >= 0, got {probe} and {examples}")
    # Similarities of unit vectors lie in [-1, 1]; at or below 0 nearly every pair of a cluster
    # would be listed (quadratic memory), at or above 1 none.
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise UsageError(f"--threshold must be between 0 and 1 (a cosine similarity), got {threshold}")


# ----------------------------------------------------------------- cluster


def cluster_stage(spec: str, out: Path, clusters: int, train_samples: int, seed: int) -> int:
    from sd3train.curation.dedup_cluster import nearest_centroids, train_kmeans

    check_cluster_options(clusters, train_samples)
    embeddings = load_embeddings(spec, out)
    start = time.perf_counter()
    centroids, info = train_kmeans(embeddings.descriptors, clusters, train_samples, seed)
    trained = time.perf_counter()
    assignment = nearest_centroids(embeddings.descriptors, centroids)[:, 0].astype(np.int32)
    write_arrays(out / CLUSTERS_NAME, {
        "centroids": centroids, "assignment": assignment,
        "shards": np.array(embeddings.names, dtype=np.str_), "counts": np.array(embeddings.counts, dtype=np.int64),
        "descriptor": np.array(embeddings.descriptor), "clusters_requested": np.array(clusters),
        "seed": np.array(seed), "train_samples": np.array(info["train_samples"]),
    })
    sizes = np.bincount(assignment, minlength=len(centroids))
    log(f"cluster done: {len(embeddings.keys)} descriptors into {info['clusters']} clusters (asked {clusters}; "
        f"trained on {info['train_samples']}) in {trained - start:.1f} s + assignment {time.perf_counter() - trained:.1f} s;"
        f" sizes min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()} -> {out / CLUSTERS_NAME}")
    return 0


# ------------------------------------------------------------------ search


def search_stage(spec: str, out: Path, threshold: float | None, probe: int, examples: int) -> int:
    from sd3train.curation.dedup_report import (
        example_groups,
        size_histogram,
        write_blocklist,
        write_examples,
        write_groups,
        write_report,
    )
    from sd3train.curation.dedup_search import choose_kept, connected_groups, find_pairs
    from sd3train.curation.descriptors import DEFAULT_THRESHOLDS

    check_search_options(threshold, probe, examples)
    embeddings = load_embeddings(spec, out)
    if not (out / CLUSTERS_NAME).exists():
        raise UsageError(f"{out / CLUSTERS_NAME} does not exist: run `{PROG} cluster` first")
    saved = read_arrays(out / CLUSTERS_NAME)
    if saved["shards"].tolist() != embeddings.names or saved["counts"].tolist() != embeddings.counts \
            or str(saved["descriptor"]) != embeddings.descriptor:
        raise UsageError(f"{out / CLUSTERS_NAME} was made from other embeddings than {out / EMBEDDINGS_DIR} "
                         f"holds for --shards: run `{PROG} cluster` again")
    repeated = [key for key, count in Counter(embeddings.keys).items() if count > 1]
    if repeated:
        raise UsageError(f"{len(repeated)} key(s) appear in several shards (e.g. {repeated[0]!r}); a blocklist names "
                         "keys, so training would drop every sample of such a key: the keys must be unique")
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS[embeddings.descriptor.split("(", 1)[0]]

    start = time.perf_counter()
    pairs, similarities = find_pairs(embeddings.descriptors, saved["assignment"], saved["centroids"], threshold, probe)
    groups = connected_groups(len(embeddings.keys), pairs)
    kept, removed = choose_kept(groups, embeddings.keys)
    searched = time.perf_counter() - start
    # data.blocklist strips each line and skips '#' comments: such a key could never be left out.
    unlistable = [key for key in removed if key != key.strip() or key.startswith("#") or "\n" in key]
    if unlistable:
        raise UsageError(f"{len(unlistable)} duplicate key(s) cannot be written to a blocklist (e.g. "
                         f"{unlistable[0]!r}): keys with surrounding spaces or a leading '#' would be read back "
                         "as something else; rename them in the shards")
    write_blocklist(out / BLOCKLIST_NAME, removed)
    write_groups(out / GROUPS_NAME, groups, embeddings.keys)
    named_groups = example_groups(groups, embeddings.keys, examples)
    shown = {key for names in named_groups for key in names}
    # Only the example keys: a {key: url} of every sample would be about 10 GB at 1e8 samples.
    url_of_key = {embeddings.keys[row]: embeddings.url_of_row(row)
                  for group in groups for row in group if embeddings.keys[row] in shown}
    entries = write_examples(out / EXAMPLES_DIR, named_groups, url_of_key)
    sizes = np.bincount(saved["assignment"], minlength=len(saved["centroids"]))
    write_report(out / REPORT_NAME, {
        "samples": len(embeddings.keys), "shards": len(embeddings.names), "descriptor": embeddings.descriptor,
        "threshold": threshold, "probe": probe, "clusters_requested": int(saved["clusters_requested"]),
        "clusters": len(saved["centroids"]), "train_samples": int(saved["train_samples"]), "seed": int(saved["seed"]),
        "cluster_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "pairs": len(pairs), "min_pair_similarity": float(similarities.min()) if len(pairs) else None,
        "groups": len(groups), "group_size_histogram": size_histogram(groups),
        "samples_in_groups": sum(len(group) for group in groups), "kept": len(kept), "blocklisted": len(removed),
        "blocklisted_fraction": len(removed) / len(embeddings.keys),
        "keep_rule": "smallest key of each group (string order)", "examples": entries,
    })
    log(f"search done in {searched:.1f} s: {len(pairs)} pair(s) above {threshold} -> {len(groups)} group(s), "
        f"{len(removed)} of {len(embeddings.keys)} samples blocklisted ({len(removed) / len(embeddings.keys):.2%}) "
        f"-> {out / BLOCKLIST_NAME}, {out / REPORT_NAME}")
    return 0
