"""k-nearest neighbours, distance-weighted (scikit-learn). Its grid counts neighbours: odd whole numbers, never
more than the training rows a fit sees, stepped past the top only and not refined between values."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.heads.classifiers import AUTO, ClassifierSpec
from pipeline.heads.stored import Stored
from pipeline.runtime.errors import InputError
from pipeline.runtime.settings import Rule


def build(n_neighbors, class_weight=None):
    if class_weight is not None:
        raise InputError("classifier knn does not support class_weight")
    from sklearn.neighbors import KNeighborsClassifier
    return KNeighborsClassifier(n_neighbors=int(n_neighbors), weights="distance")


def state(head):
    """Its training vectors and their labels, with its settings (k, weighting): fitting on them again
    rebuilds the same neighbour search."""
    if isinstance(head.classes_, list):   # fitted on a multi-label 0/1 matrix: one vote per class
        labels = np.stack([classes[column] for classes, column in zip(head.classes_, head._y.T)], 1)
    else:
        labels = head.classes_[head._y]
    return {"vectors": head._fit_X, "labels": labels}, head.get_params()


def restore(arrays, settings):
    from sklearn.neighbors import KNeighborsClassifier
    return KNeighborsClassifier(**settings).fit(arrays["vectors"], arrays["labels"])


@dataclass(frozen=True)
class NeighbourCount(ClassifierSpec):
    def candidates(self, values: list[float], n_fit: int) -> list[float]:
        kept = [v for v in values if v <= n_fit]
        if values and not kept:
            raise InputError(f"n_neighbors={values[0]:g} is more than the {n_fit} training images a fit sees")
        return kept

    def beyond(self, tried: dict, best: float, n_fit: int) -> float | None:
        values = sorted(tried)
        if best != values[-1] or len(values) < 2:
            return None
        step = int(round(best * values[-1] / values[-2])) | 1     # odd, as the grid's values are
        return None if step > n_fit else float(step)

    def refined(self, tried: dict, best: float) -> list[float]:
        return []


SPEC = NeighbourCount("k-nearest neighbours", "n_neighbors", (AUTO | int, Rule("Neighbours that vote.", min=1)),
                      (1, 3, 5, 9, 15, 25), build, floor=0.1,   # vote fractions: mostly 0 and 1
                      stored=Stored(state, restore), multi_label="native")
