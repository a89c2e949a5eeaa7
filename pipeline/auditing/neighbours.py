"""Nearest neighbours by cosine similarity, near-duplicate groups and outlier scores.

The search never holds an N x N matrix. Up to `exact_up_to` vectors it is exact: blocks of rows are
multiplied with all vectors (about 64 MB at a time) and the k best of each row kept. Above that it
searches an inverted file, as faiss's IVF indexes do: spherical k-means cuts the vectors into about
sqrt(N) lists, and each vector is compared with the members of its `probe` nearest lists only, so the
work grows as N^1.5 instead of N^2 (an exact search of 100,000 x 1,280 vectors is 2.6e13 multiply-adds,
more than two CPU cores do in ten minutes). Near-duplicates are found in that neighbour graph:
pairs above the similarity threshold (and pairs a little below it whose pixels match, pipeline.auditing.pixels),
joined into groups.

The duplicate search runs on standardised vectors (`search_space`): each feature centred and scaled to
unit variance over the cache, then L2-normalised. Raw pooled features share a large common component, so
distinct images of one scene look as alike as re-encoded copies; standardised, the copies stand out (on
planted copies of photos: 91% found with 3% false pairs at 0.85, against 83% with 5% raw at its best
threshold; benchmarks/RESULTS.md). Outlier scores use the L2-normalised vectors as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

BLOCK_BYTES = 64 << 20   # one block of similarities


def search_space(X: np.ndarray) -> np.ndarray:
    """Each column of `X` centred and scaled to unit variance, then each row L2-normalised (float32)."""
    Z = np.asarray(X, np.float32) - X.mean(axis=0, dtype=np.float64).astype(np.float32)
    Z /= Z.std(axis=0, dtype=np.float64).astype(np.float32) + 1e-6
    Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    return Z


def knn(X: np.ndarray, k: int, exact_up_to: int = 5000, probe: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """([N, k] cosine similarities, [N, k] indices) of each row's k nearest other rows, nearest first;
    `X` is L2-normalised. Rows with fewer than k others get -inf and index -1 in the missing places."""
    X = torch.from_numpy(np.ascontiguousarray(X, np.float32))
    if len(X) <= exact_up_to:
        sims, idx = _exact(X, X, k, torch.arange(len(X)))
    else:
        sims, idx = _inverted_file(X, k, probe, seed)
    return sims.numpy(), idx.numpy()


def _exact(queries: torch.Tensor, base: torch.Tensor, k: int, query_rows: torch.Tensor):
    """Top k of `queries` against all of `base`, leaving out each query's own row (`query_rows` in base)."""
    n = len(queries)
    sims = torch.full((n, k), -torch.inf)
    idx = torch.full((n, k), -1, dtype=torch.int64)
    take = min(k, len(base) - 1)
    step = max(1, BLOCK_BYTES // (4 * max(1, len(base))))
    for start in range(0, n, step):
        block = queries[start:start + step] @ base.T
        block[torch.arange(len(block)), query_rows[start:start + step]] = -torch.inf
        if take > 0:
            s, i = block.topk(take, dim=1)
            sims[start:start + step, :take], idx[start:start + step, :take] = s, i
    return sims, idx


def _kmeans(X: torch.Tensor, lists: int, seed: int, iterations: int = 10, per_list: int = 64) -> torch.Tensor:
    """Spherical k-means centroids, trained on a sample of `per_list` vectors per list (as faiss does)."""
    g = torch.Generator().manual_seed(seed)
    sample = X[torch.randperm(len(X), generator=g)[:lists * per_list]]
    centroids = sample[torch.randperm(len(sample), generator=g)[:lists]].clone()
    for _ in range(iterations):
        assign = (sample @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, sample)
        empty = sums.norm(dim=1) == 0
        sums[empty] = centroids[empty]   # a list that lost all its vectors keeps its centroid
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def _inverted_file(X: torch.Tensor, k: int, probe: int, seed: int):
    n = len(X)
    lists = max(1, round(n ** 0.5))
    probe = min(probe, lists)
    centroids = _kmeans(X, lists, seed)
    nearest = torch.cat([(X[s:s + 65536] @ centroids.T).topk(probe, dim=1).indices for s in range(0, n, 65536)])
    home = nearest[:, 0]
    cand_sims = torch.full((n, probe, k), -torch.inf)
    cand_idx = torch.full((n, probe, k), -1, dtype=torch.int64)
    order = torch.argsort(home)
    bounds = torch.searchsorted(home[order], torch.arange(lists + 1))
    for c in range(lists):
        members = order[bounds[c]:bounds[c + 1]]
        if not len(members):
            continue
        queries, slot = (nearest == c).nonzero(as_tuple=True)
        block = X[queries] @ X[members].T
        block[queries[:, None] == members[None, :]] = -torch.inf
        take = min(k, len(members))
        s, i = block.topk(take, dim=1)
        cand_sims[queries, slot, :take], cand_idx[queries, slot, :take] = s, members[i]
    s, i = cand_sims.reshape(n, -1).topk(k, dim=1)
    return s, cand_idx.reshape(n, -1).gather(1, i)


def knn_within(X: np.ndarray, labels: np.ndarray, k: int, **options) -> tuple[np.ndarray, np.ndarray]:
    """knn among the rows of the same label; indices are rows of `X`."""
    sims = np.full((len(X), k), -np.inf, np.float32)
    idx = np.full((len(X), k), -1, np.int64)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        s, i = knn(X[rows], k, **options)
        sims[rows], idx[rows] = s, np.where(i >= 0, rows[np.maximum(i, 0)], -1)
    return sims, idx


@dataclass
class Pairs:
    """Unordered neighbour pairs of images, each once (a < b)."""
    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray   # cosine similarity of the two vectors
    by_pixels: np.ndarray    # kept for its pixels (pipeline.auditing.pixels), not its similarity
    correlation: np.ndarray  # aligned pixel correlation of the two images, NaN where not compared

    def subset(self, keep: np.ndarray) -> "Pairs":
        return Pairs(self.a[keep], self.b[keep], self.similarity[keep], self.by_pixels[keep], self.correlation[keep])


def neighbour_pairs(sims: np.ndarray, idx: np.ndarray, floor: float) -> Pairs:
    """The pairs of the neighbour lists with cosine similarity >= `floor`, most similar first."""
    rows, slots = np.nonzero((sims >= floor) & (idx >= 0))
    ends = np.sort(np.stack([rows, idx[rows, slots]], axis=1), axis=1)
    ends, first = np.unique(ends, axis=0, return_index=True)
    similarity = sims[rows, slots][first]
    order = np.argsort(-similarity, kind="stable")
    return Pairs(ends[order, 0], ends[order, 1], similarity[order], np.zeros(len(order), bool),
                 np.full(len(order), np.nan))


@dataclass
class Duplicates:
    group: np.ndarray        # [M] group id of each row in a group, groups with a leak first
    rows: np.ndarray         # [M] image index
    similarity: np.ndarray   # [M] highest cosine similarity to another member
    correlation: np.ndarray  # [M] highest aligned pixel correlation to another member (NaN: none compared)
    leak: np.ndarray         # [M] the row's group spans two splits
    by_pixels: np.ndarray    # [M] joined only by pairs kept for their pixels


def duplicate_groups(pairs: Pairs, splits: np.ndarray) -> Duplicates:
    """Groups of images joined by `pairs`."""
    n = len(splits)
    best = np.full(n, -np.inf)
    np.maximum.at(best, pairs.a, pairs.similarity)
    np.maximum.at(best, pairs.b, pairs.similarity)
    correlation = np.full(n, -np.inf)
    compared = np.where(np.isnan(pairs.correlation), -np.inf, pairs.correlation)
    np.maximum.at(correlation, pairs.a, compared)
    np.maximum.at(correlation, pairs.b, compared)
    correlation[np.isneginf(correlation)] = np.nan
    by_features = np.zeros(n, bool)
    by_features[pairs.a[~pairs.by_pixels]] = by_features[pairs.b[~pairs.by_pixels]] = True
    graph = coo_matrix((np.ones(len(pairs.a)), (pairs.a, pairs.b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    rows = np.flatnonzero(best > -np.inf)
    if not len(rows):
        return Duplicates(*(np.empty(0, t) for t in (int, int, float, float, bool, bool)))
    comp = component[rows]
    leaky = {c for c in np.unique(comp) if len(set(splits[rows[comp == c]])) > 1}
    strongest = {c: best[rows[comp == c]].max() for c in np.unique(comp)}
    ranked = sorted(strongest, key=lambda c: (c not in leaky, -strongest[c], c))
    number = {c: i for i, c in enumerate(ranked)}
    group = np.array([number[c] for c in comp])
    order = np.lexsort((-best[rows], group))
    rows, group = rows[order], group[order]
    return Duplicates(group, rows, best[rows], correlation[rows], np.array([c in leaky for c in component[rows]]),
                      ~by_features[rows])


def isolation(sims: np.ndarray) -> np.ndarray:
    """Mean cosine distance to the neighbours found (NaN for a row without any)."""
    found = np.isfinite(sims)
    with np.errstate(invalid="ignore"):
        return np.where(found, 1 - sims, 0).sum(1) / found.sum(1)
