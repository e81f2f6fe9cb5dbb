"""The cluster stage: spherical k-means over the descriptors (faiss), then each one's nearest centroid.

    centroids, info = train_kmeans(descriptors, clusters=16000, train_samples=1_000_000, seed=0)
    assignment = nearest_centroids(descriptors, centroids, count=1)[:, 0]     # (N,) cluster ids

k-means is trained on a uniform sample of `train_samples` descriptors (all when there are fewer),
drawn with numpy from `seed`, sorted, so faiss sees them in shard order; faiss's own seed is the
same `seed`, so the centroids are a function of the descriptors and the settings. K is capped at
`train_samples / MIN_POINTS_PER_CENTROID` (faiss warns below 39 points per centroid, and a cluster
of a few points finds few pairs): a test set of 300 samples gets 7 clusters, 1e5 get the 1000
asked for, and SD3's 16,000 need at least 624,000 samples. Spherical: centroids are re-normalised
every iteration and points go to the centroid of largest inner product, the similarity the
search stage thresholds.
"""

from __future__ import annotations

import numpy as np

MIN_POINTS_PER_CENTROID = 39
KMEANS_ITERATIONS = 20


def clusters_for(requested: int, train_count: int) -> int:
    """The number of clusters used: `requested`, capped so each has MIN_POINTS_PER_CENTROID points."""
    return max(1, min(requested, train_count // MIN_POINTS_PER_CENTROID))


def training_sample(count: int, train_samples: int, seed: int) -> np.ndarray:
    """Sorted row indices of the k-means training sample."""
    if train_samples >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=train_samples, replace=False))


def train_kmeans(descriptors: np.ndarray, clusters: int, train_samples: int, seed: int,
                 iterations: int = KMEANS_ITERATIONS) -> tuple[np.ndarray, dict]:
    """Unit centroids (K, D) float32 and what was done (K used, sample size, objective)."""
    import faiss

    rows = training_sample(len(descriptors), train_samples, seed)
    sample = np.ascontiguousarray(descriptors[rows], dtype=np.float32)  # (n, D)
    used = clusters_for(clusters, len(sample))
    kmeans = faiss.Kmeans(
        sample.shape[1], used, niter=iterations, seed=seed, spherical=True, verbose=False,
        # The sample is already drawn: faiss must not subsample it again, nor warn about its size.
        max_points_per_centroid=-(-len(sample) // used) + 1, min_points_per_centroid=1,
    )
    kmeans.train(sample)
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    return centroids, {"clusters_requested": clusters, "clusters": used, "train_samples": len(sample),
                       "iterations": iterations, "objective": float(kmeans.obj[-1]) if len(kmeans.obj) else 0.0}


def nearest_centroids(descriptors: np.ndarray, centroids: np.ndarray, count: int = 1) -> np.ndarray:
    """(N, count) int64: each descriptor's `count` clusters of largest inner product, best first."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, nearest = index.search(np.ascontiguousarray(descriptors, dtype=np.float32), min(count, len(centroids)))
    return nearest
