"""The search stage: pairs above the similarity threshold within clusters, grouped, one kept per group.

    pairs, similarities = find_pairs(descriptors, assignment, centroids, threshold=0.5, probe=1)
    groups = connected_groups(len(descriptors), pairs)          # lists of row indices, size >= 2
    kept, removed = choose_kept(groups, keys)                   # the smallest key of each group stays

Within each cluster the descriptors go into a faiss IndexFlatIP and are range-searched against
themselves: every pair of inner product above `threshold` (faiss keeps `similarity > threshold`)
is found, exactly. A pair whose members fell into different clusters is missed, as SD3 accepts;
`probe` > 1 also searches each descriptor against the members of its `probe - 1` next-nearest
clusters (like an IVF index's nprobe), at about `probe` times the cost.

Groups are the connected components of the pair graph (union-find), so a chain a~b~c is one
group even when a and c are further apart than the threshold. The kept sample of a group is its
smallest key (plain string order): a rule that depends on the keys alone, so any run over the same
samples keeps the same ones. The others are blocklisted.
"""

from __future__ import annotations

import numpy as np

from sd3train.curation.dedup_cluster import nearest_centroids


def _members_by_cluster(assignment: np.ndarray, clusters: int) -> list[np.ndarray]:
    """Row indices of each cluster's members, ascending."""
    order = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[order], np.arange(clusters + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(clusters)]


def find_pairs(descriptors: np.ndarray, assignment: np.ndarray, centroids: np.ndarray, threshold: float,
               probe: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(P, 2) int64 row pairs (i < j, sorted) with similarity > threshold, and their similarities (P,)."""
    import faiss

    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    clusters = len(centroids)
    members = _members_by_cluster(assignment, clusters)
    queries = [members]  # probe 1: each cluster against itself
    if probe > 1:
        nearest = nearest_centroids(descriptors, centroids, probe)  # (N, probe)
        queries += [_members_by_cluster(nearest[:, column], clusters) for column in range(1, nearest.shape[1])]
    found_pairs, found_similarities = [], []
    for cluster in range(clusters):
        database = members[cluster]
        if len(database) == 0:
            continue
        index = faiss.IndexFlatIP(descriptors.shape[1])
        index.add(descriptors[database])
        for query in (column[cluster] for column in queries):
            if len(query) == 0:
                continue
            limits, similarities, found = index.range_search(descriptors[query], float(threshold))
            rows = np.repeat(query, np.diff(limits).astype(np.int64))  # the query row of each result
            other = database[found]
            keep = rows != other
            found_pairs.append(np.stack([np.minimum(rows, other), np.maximum(rows, other)], axis=1)[keep])
            found_similarities.append(similarities[keep])
    if not found_pairs:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    pairs = np.concatenate(found_pairs).astype(np.int64)
    similarities = np.concatenate(found_similarities).astype(np.float32)
    # Each pair was found from both ends (and from several probes): keep one, the largest similarity.
    order = np.lexsort((-similarities, pairs[:, 1], pairs[:, 0]))
    pairs, similarities = pairs[order], similarities[order]
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = np.any(pairs[1:] != pairs[:-1], axis=1)
    return pairs[first], similarities[first]


def connected_groups(count: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components of size >= 2 of the graph on `count` rows with edges `pairs`, each
    sorted, listed by their smallest row."""
    parent = np.arange(count)

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]  # path halving
            node = parent[node]
        return node

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    components: dict[int, list[int]] = {}
    for node in np.unique(pairs).tolist():
        components.setdefault(root(node), []).append(node)
    return sorted((sorted(group) for group in components.values()), key=lambda group: group[0])


def choose_kept(groups: list[list[int]], keys: list[str]) -> tuple[list[str], list[str]]:
    """(kept key per group, every other key of the groups, sorted): the smallest key is kept."""
    kept, removed = [], []
    for group in groups:
        names = sorted(keys[row] for row in group)
        kept.append(names[0])
        removed += names[1:]
    return kept, sorted(removed)
