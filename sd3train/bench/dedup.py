"""Near-duplicate removal cost: embed-stage descriptors/s (SSCD and thumbnail), and the wall time of
k-means + per-cluster search over synthetic SSCD-like descriptors.

    python -m sd3train.bench.dedup --out /tmp/sd3-dedup-bench                      # 1e5 descriptors, K=1000
    python -m sd3train.bench.dedup --out DIR --descriptors 1000000 --clusters 10000 --json

Embed: `--images` JPEG photos (640x480, quality 90, gradients with noise as in bench/data.py) in
one shard, embedded by the embed stage's own `Embedder` (tar read + JPEG decode (libjpeg's
draft scaling for the thumbnail; full size for SSCD) + preprocessing + model + the per-shape batching), one pass untimed first:
- `thumbnail_per_s`: the thumbnail descriptor, `--threads` decoding threads;
- `sscd_cpu_per_s`: SSCD (random weights: speed does not depend on them) at the authors' `small288`
  (640x480 -> 384x288), batch `--batch-size`, all torch threads of this machine;
- `sscd_cpu_model_per_s`: the model alone on (B, 3, 288, 384) batches, no decoding;
- `sscd_cuda_per_s`, `sscd_cuda_model_per_s`: the same on the GPU, when there is one (fp32).

Cluster + search: `--descriptors` 512-d unit vectors made like image descriptors with structure:
`TOPICS` topic directions, each vector its topic's direction plus Gaussian noise (within-topic
similarity about 0.25, across about 0), and `PLANTED_FRACTION` of them replaced by near-copies of
others (similarity about 0.9). K = `--clusters` (default 1000 for 1e5: about 100 descriptors per
cluster; SD3's 16,000 over 1e8 would be about 6,000 each). Timed: k-means training on all of
them (`kmeans_s`), the assignment (`assign_s`), the per-cluster range search at threshold 0.5 plus
grouping (`search_s`); reported with the planted copies recovered (`planted_recall`).
The results also go to `OUT/dedup_bench.json`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

PROG = "python -m sd3train.bench.dedup"
PHOTO_SIZE = (640, 480)
DIMS = 512
TOPICS = 2000
TOPIC_SIMILARITY = 0.25
PLANTED_FRACTION = 0.02
COPY_SIMILARITY = 0.9
THRESHOLD = 0.5


def _photo(rng: np.random.Generator) -> bytes:
    from PIL import Image

    width, height = PHOTO_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    base = np.stack([np.cos(angle) * x / width, np.sin(angle) * y / height, (x + y) / (width + height)], -1) * 200
    pixels = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_photo_shard(folder: Path, images: int) -> str:
    from sd3train.data.tar_writer import EncodedImage, ShardSample, read_manifest, write_shards

    path = folder / "photos-000000.tar"
    manifest = read_manifest(folder) or {}
    if not path.exists() or sum(entry["samples"] for entry in manifest.get("shards", [])) != images:
        rng = np.random.default_rng(0)
        write_shards((ShardSample(f"{index:09d}", EncodedImage(_photo(rng), "jpg"), f"photo {index}")
                      for index in range(images)), folder, prefix="photos", samples_per_shard=images)
    return str(path)


def embed_rate(url: str, descriptor, batch_size: int, threads: int) -> float:
    """Descriptors/s of the embed stage over one shard, after one untimed pass."""
    from sd3train.curation.dedup_embed import Embedder

    embedder = Embedder(descriptor, batch_size, threads)
    embedder.run(url)
    start = time.perf_counter()
    result = embedder.run(url)
    return len(result.keys) / (time.perf_counter() - start)


def model_rate(model, device: str, batch_size: int, batches: int) -> float:
    """Images/s of SSCD alone on (B, 3, 288, 384) batches (small288 of a 4:3 photo)."""
    import torch

    images = torch.randn(batch_size, 3, 288, 384, device=device)
    with torch.inference_mode():
        model(images)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            model(images)
        if device == "cuda":
            torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - start)


def synthetic_descriptors(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(count, 512) unit float32 descriptors with topic structure, and the (P, 2) planted (original, copy) rows."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((min(TOPICS, count), DIMS)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    noise = rng.standard_normal((count, DIMS)).astype(np.float32) / np.sqrt(DIMS)
    vectors = np.sqrt(TOPIC_SIMILARITY) * topics[rng.integers(0, len(topics), count)] + np.sqrt(1 - TOPIC_SIMILARITY) * noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    planted = max(1, int(count * PLANTED_FRACTION))
    rows = rng.choice(count, size=2 * planted, replace=False)
    originals, copies = rows[:planted], rows[planted:]
    jitter = rng.standard_normal((planted, DIMS)).astype(np.float32) / np.sqrt(DIMS)
    vectors[copies] = COPY_SIMILARITY * vectors[originals] + np.sqrt(1 - COPY_SIMILARITY ** 2) * jitter
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors), np.stack([originals, copies], axis=1)


def cluster_and_search(count: int, clusters: int, probe: int) -> dict:
    from sd3train.curation.dedup_cluster import nearest_centroids, train_kmeans
    from sd3train.curation.dedup_search import connected_groups, find_pairs

    descriptors, planted = synthetic_descriptors(count)
    start = time.perf_counter()
    centroids, info = train_kmeans(descriptors, clusters, train_samples=count, seed=0)
    trained = time.perf_counter()
    assignment = nearest_centroids(descriptors, centroids)[:, 0]
    assigned = time.perf_counter()
    pairs, _ = find_pairs(descriptors, assignment, centroids, THRESHOLD, probe)
    groups = connected_groups(count, pairs)
    searched = time.perf_counter()
    found = {tuple(pair) for pair in pairs.tolist()}
    recovered = sum((min(a, b), max(a, b)) in found for a, b in planted.tolist())
    sizes = np.bincount(assignment, minlength=len(centroids))
    return {
        "descriptors": count, "clusters": info["clusters"], "probe": probe, "threshold": THRESHOLD,
        "kmeans_s": trained - start, "assign_s": assigned - trained, "search_s": searched - assigned,
        "cluster_search_total_s": searched - start, "pairs": len(pairs), "groups": len(groups),
        "planted": len(planted), "planted_recall": recovered / len(planted),
        "cluster_size_max": int(sizes.max()), "cluster_size_median": float(np.median(sizes)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the photo shard (reused) and dedup_bench.json")
    parser.add_argument("--images", type=int, default=64, help="photos embedded (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="SSCD batch (default 16; 128 on a GPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="decoding threads (default: cores)")
    parser.add_argument("--descriptors", type=int, default=100_000, help="synthetic descriptors clustered")
    parser.add_argument("--clusters", type=int, default=1000, help="k-means K (default 1000: ~100 per cluster)")
    parser.add_argument("--probe", type=int, default=1)
    parser.add_argument("--model-batches", type=int, default=3, help="timed batches for the model-only rates")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = parser.parse_args(argv)
    if min(args.images, args.batch_size, args.threads, args.descriptors, args.clusters, args.model_batches) < 1:
        parser.error("every count must be >= 1")
    import torch

    from sd3train.curation.descriptors import SSCDDescriptor, ThumbnailDescriptor
    from sd3train.curation.sscd import SSCD

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    url = write_photo_shard(out / "photos", args.images)
    torch.manual_seed(0)
    model = SSCD().eval()
    results: dict = {"images": args.images, "photo_size": list(PHOTO_SIZE), "batch_size": args.batch_size,
                     "threads": args.threads, "torch_threads": torch.get_num_threads(), "preprocessing": "small288"}
    results["thumbnail_per_s"] = embed_rate(url, ThumbnailDescriptor(), 64, args.threads)
    results["sscd_cpu_per_s"] = embed_rate(url, SSCDDescriptor(None, "cpu", model=model), args.batch_size, args.threads)
    results["sscd_cpu_model_per_s"] = model_rate(model, "cpu", args.batch_size, args.model_batches)
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
        cuda = SSCDDescriptor(None, "cuda", model=model)
        results["sscd_cuda_per_s"] = embed_rate(url, cuda, args.batch_size, args.threads)
        results["sscd_cuda_model_per_s"] = model_rate(cuda.model, "cuda", args.batch_size, args.model_batches)
    results["search"] = cluster_and_search(args.descriptors, args.clusters, args.probe)
    (out / "dedup_bench.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{PROG}: embed stage, {args.images} photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, {args.threads} decoding "
          f"thread(s), {results['torch_threads']} torch thread(s)")
    for name in ("thumbnail_per_s", "sscd_cpu_per_s", "sscd_cpu_model_per_s", "sscd_cuda_per_s", "sscd_cuda_model_per_s"):
        if name in results:
            print(f"  {name:22s} {results[name]:9.1f} descriptors/s")
    search = results["search"]
    print(f"cluster + search: {search['descriptors']} descriptors, K={search['clusters']}, threshold {THRESHOLD}: "
          f"k-means {search['kmeans_s']:.1f} s, assign {search['assign_s']:.1f} s, search {search['search_s']:.1f} s "
          f"(total {search['cluster_search_total_s']:.1f} s); {search['pairs']} pairs, planted recall "
          f"{search['planted_recall']:.1%}; clusters median {search['cluster_size_median']:.0f}, max "
          f"{search['cluster_size_max']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
