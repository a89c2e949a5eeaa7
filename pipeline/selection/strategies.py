"""The strategies of `pipeline select`, on arrays: which rows of the pool to label next, in order.

Each sees the labelled vectors (with their labels) and the pool's distinct unlabelled vectors. Both are
L2-normalised and projected onto their first principal components (fitted on PCA_SAMPLE of them); k-means runs there with labelled + budget
clusters (at most MAX_CLUSTERS), exactly (scikit-learn's KMeans) up to EXACT_KMEANS_UP_TO vectors, by mini-batches
(MiniBatchKMeans) above. Every pick reports the cluster of its image, but random's (no k-means: -1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import pairwise_distances_argmin_min
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize

from pipeline.runtime.errors import warn
from pipeline.selection.settings import SelectSettings

MAX_CLUSTERS = 500           # as TypiClust: more clusters than this add little and cost much
EXACT_KMEANS_UP_TO = 20_000
PCA_SAMPLE = 10_000          # the components are fitted on this many vectors at most, then project all
SMALL_CLUSTER = 5            # typical takes from a smaller cluster only when no other is left


@dataclass
class Pick:
    row: int        # of the pool
    strategy: str
    score: float    # typical: typicality; margin: top-2 margin; coverage: distance to the nearest labelled or
                    # picked image (all in the projected space); random: NaN
    cluster: int


@dataclass
class Space:
    """Labelled and pool vectors, projected and clustered."""
    labelled: np.ndarray
    pool: np.ndarray
    labelled_clusters: np.ndarray
    pool_clusters: np.ndarray
    k: int


def space(labelled: np.ndarray, pool: np.ndarray, budget: int, s: SelectSettings) -> Space:
    both = normalize(np.concatenate([labelled, pool]).astype(np.float32))
    n_components = min(s.components, both.shape[1], len(both))
    if n_components < both.shape[1]:
        rng = np.random.default_rng(s.seed)
        sample = both[rng.choice(len(both), PCA_SAMPLE, replace=False)] if len(both) > PCA_SAMPLE else both
        both = PCA(n_components, svd_solver="randomized", random_state=s.seed).fit(sample).transform(both)
    k = min(len(labelled) + budget, MAX_CLUSTERS, len(both))
    if len(both) <= EXACT_KMEANS_UP_TO:
        kmeans = KMeans(k, n_init=3, random_state=s.seed)
    else:
        kmeans = MiniBatchKMeans(k, n_init=3, batch_size=4096, random_state=s.seed)
    clusters = kmeans.fit_predict(both)
    n = len(labelled)
    return Space(both[:n], both[n:], clusters[:n], clusters[n:], k)


def typicality(vectors: np.ndarray, neighbours: int) -> np.ndarray:
    """The inverse mean distance of each vector to its `neighbours` nearest others (TypiClust)."""
    if len(vectors) < 2:
        return np.zeros(len(vectors))
    k = min(neighbours, len(vectors) - 1)
    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(vectors).kneighbors(vectors)
    return 1 / (distances[:, 1:].mean(axis=1) + 1e-12)


def typical(sp: Space, budget: int, neighbours: int) -> list[Pick]:
    """TypiClust: again and again, the cluster with the fewest labelled (or picked) images, the largest first,
    and in it the most typical image not yet picked."""
    sizes = np.bincount(np.concatenate([sp.labelled_clusters, sp.pool_clusters]), minlength=sp.k)
    covered = np.bincount(sp.labelled_clusters, minlength=sp.k)
    left = np.bincount(sp.pool_clusters, minlength=sp.k)
    scores: dict[int, np.ndarray] = {}
    picks: list[Pick] = []
    for _ in range(budget):
        c = min(np.flatnonzero(left), key=lambda c: (covered[c], sizes[c] < SMALL_CLUSTER, -sizes[c], c))
        members = np.flatnonzero(sp.pool_clusters == c)
        if c not in scores:
            together = np.concatenate([sp.labelled[sp.labelled_clusters == c], sp.pool[members]])
            scores[c] = typicality(together, neighbours)[-len(members):]
        best = int(np.argmax(scores[c]))
        picks.append(Pick(int(members[best]), "typical", float(scores[c][best]), int(c)))
        scores[c][best] = -np.inf
        covered[c] += 1
        left[c] -= 1
    return picks


def margin(labelled: np.ndarray, labels: np.ndarray, pool: np.ndarray, sp: Space, budget: int,
           C: float) -> list[Pick]:
    """The smallest top-2 margins of a logistic regression on the labelled vectors, at most one per cluster
    (a second round through the clusters only when there are fewer clusters than picks)."""
    model = LogisticRegression(C=C, max_iter=2000).fit(normalize(labelled), labels)
    top2 = np.sort(model.predict_proba(normalize(pool)), axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    picks: list[Pick] = []
    taken = np.zeros(len(pool), bool)
    while len(picks) < budget:
        used: set[int] = set()
        for i in np.argsort(margins, kind="stable"):
            c = int(sp.pool_clusters[i])
            if not taken[i] and c not in used and len(picks) < budget:
                used.add(c)
                taken[i] = True
                picks.append(Pick(int(i), "margin", float(margins[i]), c))
    return picks


def coverage(sp: Space, budget: int) -> list[Pick]:
    """Greedy k-center: each pick is the pool image farthest from every labelled and picked image (with none
    labelled, the first is the image nearest the mean)."""
    first = None
    if len(sp.labelled):
        _, nearest = pairwise_distances_argmin_min(sp.pool, sp.labelled)
    else:
        first = int(np.argmin(np.linalg.norm(sp.pool - sp.pool.mean(axis=0), axis=1)))
        nearest = np.full(len(sp.pool), np.inf)
    picks: list[Pick] = []
    for n in range(budget):
        i = first if n == 0 and first is not None else int(np.argmax(nearest))
        score = float(nearest[i]) if np.isfinite(nearest[i]) else math.nan
        picks.append(Pick(i, "coverage", score, int(sp.pool_clusters[i])))
        nearest = np.minimum(nearest, np.linalg.norm(sp.pool - sp.pool[i], axis=1))
        nearest[i] = -1.0
    return picks


def random_picks(n_pool: int, budget: int, seed: int) -> list[Pick]:
    """A seeded draw, without the projection and the k-means (cluster -1)."""
    rows = np.random.default_rng(seed).choice(n_pool, budget, replace=False)
    return [Pick(int(i), "random", math.nan, -1) for i in rows]


def resolved(strategy: str, labels: np.ndarray, n_classes: int, auto_switch: float) -> str:
    """The strategy to run: auto is typical below `auto_switch` labelled images per class, then margin;
    margin needs two labelled classes, else typical does (with a warning when margin was asked for)."""
    labelled_classes = len(np.unique(labels))
    if strategy == "auto":
        many = n_classes and len(labels) >= auto_switch * n_classes
        return "margin" if many and labelled_classes >= 2 else "typical"
    if strategy == "margin" and labelled_classes < 2:
        warn(f"margin needs labelled images of two classes at least, there are of {labelled_classes}; "
             f"picking by typical instead")
        return "typical"
    return strategy


def choose(labelled: np.ndarray, labels: np.ndarray, pool: np.ndarray, n_classes: int, s: SelectSettings) -> list[Pick]:
    """`s.budget` distinct rows of `pool` (vectors of images without a label) in the order to label them."""
    strategy = resolved(s.strategy, labels, n_classes, s.auto_switch)
    if strategy == "random":
        return random_picks(len(pool), s.budget, s.seed)
    sp = space(labelled, pool, s.budget, s)
    if strategy == "typical":
        return typical(sp, s.budget, s.neighbours)
    if strategy == "margin":
        return margin(labelled, labels, pool, sp, s.budget, s.C)
    return coverage(sp, s.budget)
