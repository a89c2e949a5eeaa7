"""Stage two protocol: choose hyperparameters without the evaluation split, refit, evaluate once.

With a test split: each candidate is fitted on train and scored on val; the winner is refitted
on train+val and evaluated on test. Without one (train/val layouts): candidates are scored by
stratified k-fold cross-validation on train; the winner is refitted on train and evaluated on val.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.utils._param_validation import InvalidParameterError

from pipeline.heads.classifiers import CLASSIFIERS, TorchHead, has_probabilities, head_scores, make_head
from pipeline.heads.metrics import confusion_png, confusion_rows, evaluate
from pipeline.runtime.errors import UserError
from pipeline.storage import modeldir
from pipeline.storage.cache import check_expected, open_cache

PREPROCESSING = ("l2", "standardize", "none")


@dataclass
class TrainSettings:
    classifier: str
    value: float | str = "auto"          # the tuned hyperparameter, or "auto" to search for it
    params: dict = field(default_factory=dict)
    preprocess: str = "l2"
    class_weight: str | None = None
    cv_folds: int = 5
    seed: int = 0


def _preprocessor(kind: str):
    if kind not in PREPROCESSING:
        raise UserError(f"preprocess must be one of {', '.join(PREPROCESSING)}, got {kind!r}")
    return {"l2": Normalizer(), "standardize": StandardScaler(), "none": FunctionTransformer()}[kind]


def _fit(s: TrainSettings, value, X, y, X_val=None, y_val=None, epochs: int | None = None):
    """A fitted preprocessing+head pipeline; torch heads early-stop on (X_val, y_val) when given."""
    seeded = {"seed": s.seed} if "seed" in CLASSIFIERS[s.classifier].params else {}
    params = {**seeded, **s.params, **({"epochs": epochs} if epochs else {})}
    model = make_pipeline(_preprocessor(s.preprocess), make_head(s.classifier, value, s.class_weight, **params))
    if isinstance(model[-1], TorchHead):
        pre = model[0].fit(X)
        model[-1].fit(pre.transform(X), y, *((pre.transform(X_val), y_val) if X_val is not None else ()))
    else:
        try:
            model.fit(X, y)
        except InvalidParameterError as exc:   # sklearn's own check of a setting, e.g. gamma='huge'
            raise UserError(str(exc))
    return model


def scores_of(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Scores with one column per class of the cache, even for classes the head never saw."""
    raw = head_scores(model[-1], model[0].transform(X))
    full = np.full((len(X), n_classes), 0.0 if has_probabilities(model[-1]) else -np.inf)
    full[:, model[-1].classes_] = raw
    return full


def _best(tried: dict) -> float:
    """Highest score; ties go to the value nearest 1 on a log scale (the middle of the grids)."""
    return max(tried, key=lambda v: (tried[v][0], -abs(np.log10(v))))


def _candidates(s: TrainSettings, tried: dict) -> list:
    """First the fixed value or the coarse grid; then five log-spaced points around the best."""
    if not tried:
        return [float(s.value)] if s.value != "auto" else list(CLASSIFIERS[s.classifier].grid)
    grid = CLASSIFIERS[s.classifier].grid
    if s.value != "auto" or s.classifier == "knn":
        return []
    i = grid.index(_best(tried))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    return [float(v) for v in np.geomspace(lo, hi, 5) if not np.isclose(v, list(tried)).any()]


def cv_folds(s: TrainSettings, y: np.ndarray) -> int:
    """Folds for selection without a test split: `s.cv_folds`, fewer when a class has fewer images."""
    counts = np.bincount(y)
    k = int(min(s.cv_folds, counts[counts > 0].min()))
    if k < 2:
        raise UserError("cannot cross-validate: some class has fewer than 2 training images")
    return k


def select(s: TrainSettings, X, y, X_val=None, y_val=None) -> tuple[float, dict, int | None]:
    """Score each candidate on (X_val, y_val), or by stratified k-fold on (X, y) when there is no
    val set. Returns (best value, {value: score}, epochs for torch heads)."""
    if X_val is None:
        k = cv_folds(s, y)
        folds = [(X[tr], y[tr], X[va], y[va])
                 for tr, va in StratifiedKFold(k, shuffle=True, random_state=s.seed).split(X, y)]
    else:
        folds = [(X, y, X_val, y_val)]
    smallest_fit = min(len(f[1]) for f in folds)
    tried: dict = {}
    for _round in ("coarse", "refine"):
        for value in _candidates(s, tried):
            if s.classifier == "knn" and value > smallest_fit:
                continue   # more neighbours than training images
            scores, epochs = [], []
            for Xa, ya, Xb, yb in folds:
                model = _fit(s, value, Xa, ya, Xb, yb)
                scores.append(float(np.mean(model.predict(Xb) == yb)))
                epochs.append(getattr(model[-1], "best_epoch_", None))
            tried[value] = (float(np.mean(scores)), None if epochs[0] is None else int(np.median(epochs)))
    if not tried:
        raise UserError(f"n_neighbors={s.value} is more than the {smallest_fit} training images a fit sees")
    best = _best(tried)
    return best, {f"{v:g}": sc for v, (sc, _) in sorted(tried.items())}, tried[best][1]


def train(cache_path: Path, out_dir: Path, s: TrainSettings, expected: dict | None = None) -> dict:
    """Fit classifier `s.classifier` on a feature cache and write a model directory. `expected`
    ({field: value}, e.g. {"backbone": "resnet18"}) makes it refuse a cache made otherwise."""
    modeldir.check_out(out_dir)
    with open_cache(cache_path) as cache:   # everything from this one file, even if it is replaced meanwhile
        check_expected(cache, expected or {})
        if "val" not in cache.splits:
            raise UserError(f"feature cache {cache_path} has no val split; stage two needs train and val")
        has_test = "test" in cache.splits
        train_, val = cache.read("train"), cache.read("val")
        test = cache.read("test") if has_test else None
        dataset = cache.dataset_id()
    eval_split = "test" if has_test else "val"
    start = time.perf_counter()
    value, search, epochs = (select(s, train_.features, train_.labels, val.features, val.labels) if has_test
                             else select(s, train_.features, train_.labels))
    if has_test:
        X = np.concatenate([train_.features, val.features])
        y = np.concatenate([train_.labels, val.labels])
        evaluation = test
    else:
        X, y, evaluation = train_.features, train_.labels, val
    model = _fit(s, value, X, y, epochs=epochs)
    fit_seconds = time.perf_counter() - start
    t = time.perf_counter()
    scores = scores_of(model, evaluation.features, len(cache.classes))
    predict_seconds = time.perf_counter() - t
    metrics = evaluate(evaluation.labels, scores, cache.classes, has_probabilities(model[-1]))
    tuned = CLASSIFIERS[s.classifier].tuned
    metrics.update(eval_split=eval_split, n_train=len(train_.labels), n_val=len(val.labels),
                   n_test=len(evaluation.labels) if has_test else 0, n_eval=len(evaluation.labels),
                   fit_seconds=fit_seconds, predict_seconds=predict_seconds,
                   extract_seconds=cache.attrs.get("extract_seconds"),
                   hyperparameters={**s.params, tuned: value, **({"epochs": epochs} if epochs else {}),
                                    "preprocess": s.preprocess, "class_weight": s.class_weight},
                   selection="val" if has_test else f"{cv_folds(s, train_.labels)}-fold cv on train",
                   search=search)
    info = {"kind": "features", "classifier": s.classifier, "classes": cache.classes,
            "backbone": _backbone_spec(cache.attrs),
            "fingerprint": cache.attrs["fingerprint"], "feature_preprocessing": s.preprocess,
            "dataset": dataset}
    y_pred = scores.argmax(1)
    modeldir.save(out_dir, model, info, metrics, confusion_rows(evaluation.labels, y_pred, cache.classes))
    confusion_png(evaluation.labels, y_pred, cache.classes, Path(out_dir) / "confusion.png",
                  f"{s.classifier} on {eval_split}: top-1 {metrics['top1']:.3f}")
    return metrics


def _backbone_spec(attrs: dict) -> dict:
    """The backbone spec recorded in a cache, in the form Backbone.spec() returns it."""
    return {"backbone": attrs["backbone"], "weights": attrs["weights"], "weights_sha256": attrs["weights_sha256"],
            "layer": attrs["layer"], "tta": bool(attrs["tta"]), "preprocessing": json.loads(attrs["transform"])}
