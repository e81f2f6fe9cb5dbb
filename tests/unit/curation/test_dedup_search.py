"""Pairs within clusters (and across, with --probe), groups by union-find, the kept key, k-means settings."""

from __future__ import annotations

import numpy as np

from sd3train.curation.dedup_cluster import (
    clusters_for,
    nearest_centroids,
    train_kmeans,
)
from sd3train.curation.dedup_search import choose_kept, connected_groups, find_pairs


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_a_pair_across_two_clusters_is_found_only_with_probe():
    centroids = unit(np.eye(4)[:2])  # clusters 0 and 1
    descriptors = unit([[0.72, 0.69, 0, 0], [0.69, 0.72, 0, 0], [1, 0, 0.3, 0], [0, 1, 0, 0.3]])
    assignment = nearest_centroids(descriptors, centroids)[:, 0]
    assert assignment.tolist() == [0, 1, 0, 1]
    pairs, similarities = find_pairs(descriptors, assignment, centroids, threshold=0.99, probe=1)
    assert pairs.tolist() == []
    pairs, similarities = find_pairs(descriptors, assignment, centroids, threshold=0.99, probe=2)
    assert pairs.tolist() == [[0, 1]]
    np.testing.assert_allclose(similarities, [float(descriptors[0] @ descriptors[1])], rtol=1e-6)


def test_pairs_within_a_cluster_are_exact_and_listed_once():
    rng = np.random.default_rng(0)
    descriptors = unit(rng.normal(size=(60, 16)))
    descriptors[10] = unit([descriptors[3] + 0.05 * rng.normal(size=16)])[0]
    descriptors[20] = unit([descriptors[3] + 0.05 * rng.normal(size=16)])[0]
    centroids = unit(descriptors[:1])
    pairs, similarities = find_pairs(descriptors, np.zeros(60, dtype=np.int64), centroids, threshold=0.9)
    brute = descriptors @ descriptors.T
    expected = [[i, j] for i in range(60) for j in range(i + 1, 60) if brute[i, j] > 0.9]
    assert pairs.tolist() == expected == [[3, 10], [3, 20], [10, 20]]
    np.testing.assert_allclose(similarities, [brute[i, j] for i, j in expected], rtol=1e-5)


def test_groups_are_connected_components_and_keep_the_smallest_key():
    pairs = np.array([[5, 7], [1, 5], [2, 9], [7, 8]])  # 1-5-7-8 is one chain
    groups = connected_groups(10, pairs)
    assert groups == [[1, 5, 7, 8], [2, 9]]
    keys = ["k0", "z1", "k2", "k3", "k4", "b5", "k6", "a7", "c8", "a9"]
    kept, removed = choose_kept(groups, keys)
    assert kept == ["a7", "a9"] and removed == ["b5", "c8", "k2", "z1"]


def test_kmeans_is_seeded_and_capped_by_the_sample_size():
    rng = np.random.default_rng(1)
    descriptors = unit(rng.normal(size=(400, 8)))
    first, info = train_kmeans(descriptors, clusters=1000, train_samples=200, seed=3)
    second, _ = train_kmeans(descriptors, clusters=1000, train_samples=200, seed=3)
    assert info["clusters"] == clusters_for(1000, 200) == 5 and info["train_samples"] == 200
    assert first.tobytes() == second.tobytes()
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)  # spherical
    other, _ = train_kmeans(descriptors, clusters=1000, train_samples=200, seed=4)
    assert other.tobytes() != first.tobytes()
    assert clusters_for(16000, 100_000_000) == 16000 and clusters_for(16000, 10) == 1
