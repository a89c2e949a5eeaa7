"""Outliers as a ranking of every image, most unusual first.

An image's isolation is its mean cosine distance to its k nearest neighbours, among all images and within
its class, each over the median image's (1 is typical). Its lack of class content is its cosine distance
to the nearest class centre (the mean of a class's L2-normalised vectors), again over the median image's:
a flat frame, noise, a gradient, a page of text or a placeholder resembles no class, though several of
them may resemble each other. The score is the mean of the three ratios.

In a multi-label cache (labels: a [N, classes] 0/1 matrix) a class's images are those carrying it: an image's
distance within its class is the mean over its classes, and a class centre is the mean of its images. An
image without a label has no distance within a class (left out of its score).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.auditing import neighbours
from pipeline.heads.familiarity import mean_distance


@dataclass
class OutlierScores:
    score: np.ndarray        # [N] the ranking's score, higher: more unusual
    in_class: np.ndarray     # [N] mean cosine distance to the k nearest images of the same label
    overall: np.ndarray      # [N] mean cosine distance to the k nearest images
    no_content: np.ndarray   # [N] cosine distance to the nearest class centre
    isolation: np.ndarray    # [N] the two distances over the median image's, averaged

    def ranking(self) -> np.ndarray:
        """Every row, most unusual first (NaN scores last)."""
        return np.argsort(-np.nan_to_num(self.score, nan=-np.inf), kind="stable")


def membership(labels: np.ndarray) -> np.ndarray:
    """[N, classes] bool: the classes each image carries (one each for a label vector, its present classes)."""
    return labels.astype(bool) if labels.ndim == 2 else labels[:, None] == np.unique(labels)


def class_centre_distance(X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N] cosine distance of each L2-normalised row of `X` to the nearest mean of a class's rows."""
    centres = np.stack([X[rows].mean(0) for rows in membership(labels).T if rows.any()])
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    return 1 - (X @ centres.T).max(1)


def in_class_distance(X: np.ndarray, labels: np.ndarray, k: int, **search) -> np.ndarray:
    """[N] mean cosine distance to the k nearest images of the same class; over an image's classes, the mean
    of those distances (NaN for an image of no class)."""
    if labels.ndim == 1:
        return mean_distance(neighbours.knn_within(X, labels, k, **search)[0])
    total, count = np.zeros(len(X)), np.zeros(len(X))
    for rows in map(np.flatnonzero, membership(labels).T):
        distance = mean_distance(neighbours.knn(X[rows], k, **search)[0]) if len(rows) else np.empty(0)
        found = ~np.isnan(distance)
        total[rows[found]] += distance[found]
        count[rows[found]] += 1
    with np.errstate(invalid="ignore"):
        return total / np.where(count > 0, count, np.nan)


def _over_median(values: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return values / np.nanmedian(values)


def scores(X: np.ndarray, labels: np.ndarray, k: int, **search) -> OutlierScores:
    """The outlier scores of the L2-normalised rows of `X` (search: options of neighbours.knn)."""
    overall = mean_distance(neighbours.knn(X, k, **search)[0])
    in_class = in_class_distance(X, labels, k, **search)
    no_content = class_centre_distance(X, labels)
    with np.errstate(invalid="ignore"):
        isolation = np.nanmean([_over_median(overall), _over_median(in_class)], axis=0)
        score = np.nanmean([_over_median(overall), _over_median(in_class), _over_median(no_content)], axis=0)
    return OutlierScores(score, in_class, overall, no_content, isolation)
