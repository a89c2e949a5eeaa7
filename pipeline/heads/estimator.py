"""A scikit-learn classifier of the user's as a head of stage two (`pipeline.train(cache, RidgeClassifier(),
grid={"alpha": [...]})`): the same protocol as the zoo's classifiers (pipeline.heads.train), over the grid
as given. Each point of the grid is fitted on train and scored on val (or by k-fold on train without a test
split); the best, ties going to the point nearest the middle of the grid, is refitted and evaluated once.
Saved, it is kept with skops (pipeline.heads.stored.form), never pickled."""
from __future__ import annotations

import numpy as np
from sklearn.base import clone, is_classifier
from sklearn.model_selection import ParameterGrid
from sklearn.pipeline import make_pipeline

from pipeline.heads.settings import TrainSettings
from pipeline.heads.train import Selection, _preprocessor, selection_folds
from pipeline.runtime.errors import InputError


def _grid_points(estimator, grid: dict | None) -> list[dict]:
    """The grid's points, each a {parameter: value}; refuses parameters the estimator does not have."""
    if not grid:
        return [{}]
    if not isinstance(grid, dict) or not all(isinstance(v, (list, tuple)) and v for v in grid.values()):
        raise InputError(f"grid must map parameter names to non-empty lists of values, got {grid!r}")
    unknown = sorted(set(grid) - set(estimator.get_params()))
    if unknown:
        raise InputError(f"{type(estimator).__name__} has no parameter {unknown[0]!r}; "
                        f"it takes: {', '.join(sorted(estimator.get_params()))}")
    return list(ParameterGrid(grid))


class EstimatorHead:
    """A user's unfitted scikit-learn classifier and the grid to choose its parameters from."""
    in_torch = False

    def __init__(self, estimator, grid: dict | None = None):
        if not (hasattr(estimator, "get_params") and hasattr(estimator, "fit") and is_classifier(estimator)):
            raise InputError(f"classifier must be a name of the zoo or a scikit-learn classifier, got {estimator!r}")
        self.estimator, self.points = estimator, _grid_points(estimator, grid)
        self.name = type(estimator).__name__
        self.tuned = ", ".join(grid) if grid else None

    def _fit(self, s: TrainSettings, point: dict, X, y):
        if s.class_weight:
            raise InputError(f"class_weight is a setting of the zoo's classifiers; set it on the {self.name} itself")
        model = make_pipeline(_preprocessor(s.preprocess), clone(self.estimator).set_params(**point))
        try:
            return model.fit(X, y)
        except ValueError as exc:   # sklearn's own check of a value, e.g. alpha=-1
            raise InputError(f"{self.name}{point or ''}: {exc}")

    def select(self, s: TrainSettings, X, y, X_val=None, y_val=None) -> Selection:
        folds = selection_folds(s, X, y, X_val, y_val)
        if not folds:   # no fold can score a class with a single image: the middle point, unscored
            return Selection((len(self.points) - 1) // 2, None, {}, None, [])
        scores = [float(np.mean([np.mean(self._fit(s, point, Xa, ya).predict(Xb) == yb)
                                 for Xa, ya, Xb, yb in folds])) for point in self.points]
        middle = (len(scores) - 1) / 2
        best = max(range(len(scores)), key=lambda i: (scores[i], -abs(i - middle)))
        return Selection(best, scores[best], dict(enumerate(scores)), None, [])

    def refit(self, s: TrainSettings, chosen: Selection, X, y):
        return self._fit(s, self.points[chosen.value], X, y)

    def hyperparameters(self, s: TrainSettings, chosen: Selection) -> dict:
        """The chosen point, as JSON can hold it (a value that is not a number or text by its repr)."""
        return {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                for k, v in self.points[chosen.value].items()}

    def search(self, chosen: Selection) -> dict:
        return {"hyperparameter": self.tuned,
                "scores": {_label(self.points[i]): score for i, score in chosen.scores.items()}, "warnings": []}


def _label(point: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()) or "default"
