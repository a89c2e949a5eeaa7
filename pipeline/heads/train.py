"""Stage two protocol: choose hyperparameters without the evaluation split, refit, evaluate once.

With a test split: each candidate is fitted on train and scored on val; the winner is refitted
on train+val and evaluated on test. Without one (train/val layouts): candidates are scored by
stratified k-fold cross-validation on train; the winner is refitted on train and evaluated on val.
Without val (early rounds of labelling from a pool, when extract keeps small classes whole in train): k-fold
on train, evaluated on test. When some labelled class has a single training image no fold can score it:
the value nearest the middle of the grid is kept unscored (val_score null), with a warning.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.utils._param_validation import InvalidParameterError

from pipeline.features.spec import BackboneSpec
from pipeline.heads import calibration, multilabel, stored
from pipeline.heads.classifiers import has_probabilities, head_scores, make_head, one_thread_if_small
from pipeline.heads.familiarity import Familiarity
from pipeline.heads.metrics import confusion_png, confusion_rows, evaluate, precision_recall_png
from pipeline.heads.settings import CLASSIFIERS, PREPROCESSING, TrainSettings
from pipeline.runtime.errors import InputError, warn
from pipeline.storage import modeldir
from pipeline.storage.cache import check_expected, fingerprinted, open_cache


def _preprocessor(kind: str):
    if kind not in PREPROCESSING:
        raise InputError(f"preprocess must be one of {', '.join(PREPROCESSING)}, got {kind!r}")
    return {"l2": Normalizer(), "standardize": StandardScaler(), "none": FunctionTransformer()}[kind]


def _fit(s: TrainSettings, value, X, y, X_val=None, y_val=None, epochs: int | None = None, search: bool = False):
    """A fitted preprocessing+head pipeline; torch heads early-stop on (X_val, y_val) when given. `search`:
    the head's cheaper stand-in for scoring a candidate value, where it has one (`for_search`)."""
    spec = CLASSIFIERS[s.classifier]
    seeded = {"seed": s.seed} if "seed" in spec.params else {}
    params = {**seeded, **s.params, **({"epochs": epochs} if epochs else {})}
    head = make_head(s.classifier, value, s.class_weight, **params)
    if np.ndim(y) == 2:   # a multi-label 0/1 matrix
        head = multilabel.wrapped(s.classifier, head)
    if search and hasattr(head, "for_search"):
        head = head.for_search()
    model = make_pipeline(_preprocessor(s.preprocess), head)
    if spec.early_stops:
        pre = model[0].fit(X)
        model[-1].fit(pre.transform(X), y, *((pre.transform(X_val), y_val) if X_val is not None else ()))
    else:
        try:
            model.fit(X, y)
        except InvalidParameterError as exc:   # sklearn's own check of a setting, e.g. gamma='huge'
            raise InputError(str(exc))
    return model


def scores_of(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Scores with one column per class of the cache, even for classes the head never saw; a multi-label head's
    are `multilabel.scores_of`."""
    if multilabel.is_multi_label(model[-1]):
        return multilabel.scores_of(model, X)
    raw = head_scores(model[-1], model[0].transform(X))
    full = np.full((len(X), n_classes), 0.0 if has_probabilities(model[-1]) else -np.inf)
    full[:, model[-1].classes_] = raw
    return full


class Trial(NamedTuple):
    """One candidate value's result in the search."""
    score: float              # mean accuracy on val (or over the folds); multi-label: macro AP
    epochs: int | None        # torch heads: the median best epoch, used for the refit


def _from_middle(value: float, grid: tuple) -> float:
    """How far `value` lies from the middle of `grid` on a log scale."""
    return abs(np.log(value / np.sqrt(float(grid[0]) * float(grid[-1]))))


def _best(tried: dict[float, Trial], grid: tuple) -> float:
    """Highest score; ties go to the value nearest the middle of the grid on a log scale."""
    return max(tried, key=lambda v: (tried[v].score, -_from_middle(v, grid)))


def cv_folds(s: TrainSettings, y: np.ndarray) -> int:
    """Folds for selection without a val split to score on: `s.cv_folds`, fewer when a class has fewer
    images (multi-label: fewer images); 0 when some labelled class has a single image (no fold could score it)."""
    if np.ndim(y) == 2:
        return min(s.cv_folds, len(y))
    counts = np.bincount(y)
    k = int(min(s.cv_folds, counts[counts > 0].min()))
    return k if k >= 2 else 0


def selection_folds(s: TrainSettings, X, y, X_val=None, y_val=None) -> list[tuple]:
    """(X_fit, y_fit, X_score, y_score) of each fold a candidate is scored on: (X, y) against the val set,
    or stratified k-fold on (X, y) when there is none; no fold when `cv_folds` allows none."""
    if X_val is not None:
        return [(X, y, X_val, y_val)]
    k = cv_folds(s, y)
    if not k:
        return []
    split = KFold if np.ndim(y) == 2 else StratifiedKFold   # multi-label: folds by rows
    folds = split(k, shuffle=True, random_state=s.seed).split(X, y)
    return [(X[tr], y[tr], X[va], y[va]) for tr, va in folds]


@dataclass
class Selection:
    """The outcome of a hyperparameter search: the chosen value, its score and every score tried."""
    value: float
    score: float | None                  # the chosen value's mean accuracy on val (or over the folds); None:
                                         # no fold to score on, the value was kept unscored
    scores: dict                         # {value: score}
    epochs: int | None                   # torch heads: the median best epoch of the chosen value
    warnings: list[str]


def select(s: TrainSettings, X, y, X_val=None, y_val=None) -> Selection:
    """Score each candidate on (X_val, y_val), or by stratified k-fold on (X, y) when there is no val
    set: the coarse grid; if every value scores the same, stop there; if the best is at an edge, step
    past it (twice at most); then a finer grid around the best."""
    folds = selection_folds(s, X, y, X_val, y_val)
    spec = CLASSIFIERS[s.classifier]
    if not folds:
        value = float(s.value) if s.value != "auto" else \
            min(spec.candidates(spec.grid, len(y)), key=lambda v: _from_middle(v, spec.grid))
        return Selection(value, None, {}, None, [])
    smallest_fit = min(len(f[1]) for f in folds)
    tried: dict[float, Trial] = {}

    def score(values):
        for value in spec.candidates(values, smallest_fit):
            scores, epochs = [], []
            for Xa, ya, Xb, yb in folds:
                model = _fit(s, value, Xa, ya, Xb, yb, search=True)
                scores.append(multilabel.score(model, Xb, yb) if np.ndim(yb) == 2
                              else float(np.mean(model.predict(Xb) == yb)))
                epochs.append(getattr(model[-1], "best_epoch_", None))
            tried[value] = Trial(float(np.mean(scores)), None if epochs[0] is None else int(np.median(epochs)))

    grid, tuned = spec.grid, spec.tuned
    score([float(s.value)] if s.value != "auto" else grid)
    warnings = []
    flat = len(tried) > 1 and len({trial.score for trial in tried.values()}) == 1
    if flat:
        warnings.append(f"every {tuned} tried scored {next(iter(tried.values())).score:.3f}: the search is flat; "
                        f"kept {_best(tried, grid):g} from the middle of the grid and stopped")
    elif s.value == "auto":
        for _step in range(2):
            step = spec.beyond(tried, _best(tried, grid), smallest_fit)
            if step is None:
                break
            score([step])
        edge = _best(tried, grid)
        if spec.beyond(tried, edge, smallest_fit) is not None:
            warnings.append(f"{tuned}={edge:g} is at the edge of the values tried ({min(tried):g} to "
                            f"{max(tried):g}): a value beyond it may score better; set it in params.yaml "
                            f"(or --param) to try")
        score(spec.refined(tried, edge))
    best = _best(tried, grid)
    for message in warnings:
        warn(f"{s.classifier}: {message}")
    return Selection(best, tried[best].score, {v: trial.score for v, trial in sorted(tried.items())},
                     tried[best].epochs, warnings)


class ZooHead:
    """A classifier of the zoo (`CLASSIFIERS`) as `fit_head` uses it; pipeline.heads.estimator gives a
    scikit-learn estimator of the user's the same surface."""

    def __init__(self, s: TrainSettings):
        self.name, self.tuned = s.classifier, CLASSIFIERS[s.classifier].tuned
        self.in_torch = CLASSIFIERS[s.classifier].in_torch

    def select(self, s: TrainSettings, X, y, X_val=None, y_val=None) -> Selection:
        return select(s, X, y, X_val, y_val)

    def refit(self, s: TrainSettings, chosen: Selection, X, y):
        return _fit(s, chosen.value, X, y, epochs=chosen.epochs)

    def hyperparameters(self, s: TrainSettings, chosen: Selection) -> dict:
        return {**s.params, self.tuned: chosen.value, **({"epochs": chosen.epochs} if chosen.epochs else {})}

    def search(self, chosen: Selection) -> dict:
        return {"hyperparameter": self.tuned, "scores": {f"{v:g}": sc for v, sc in chosen.scores.items()},
                "warnings": chosen.warnings}


@dataclass
class Trained:
    """A fitted head and everything its model directory records, before it is written (`save`)."""
    model: object              # the fitted preprocessing + classifier pipeline
    info: dict                 # model.json, less what writing it adds
    metrics: dict
    labels: np.ndarray         # the evaluation split's labels and the predicted ones, for the confusion matrix
    predicted: np.ndarray
    familiarity: Familiarity   # the training vectors new images are compared with, and the novelty threshold
    held_out: tuple            # (labels, scores) of the images no fit saw (modeldir.HELD_OUT)


def labelled_splits(cache, cache_path: Path) -> dict:
    """train and whichever of val and test the cache has, read; refuses a cache stage two cannot learn from
    or evaluate on."""
    splits = set(cache.splits)
    later = " (label images of the pool first: docs/select.md)" if cache.has_pool else ""
    evaluated = ("val",) if cache.multi_label else ("val", "test")   # multi-label tunes its thresholds on val
    if "train" not in splits or not splits & set(evaluated):
        missing = "train" if "train" not in splits else " or ".join(evaluated)
        raise InputError(f"feature cache {cache_path} has no {missing} split; stage two needs train, and "
                         f"{' or '.join(evaluated)}" + later)
    parts = {split: cache.read(split) for split in ("train", "val", "test") if split in splits}
    if not cache.multi_label and len(np.unique(parts["train"].labels)) < 2:
        raise InputError(f"feature cache {cache_path} has training images of one class only; stage two needs "
                         f"two at least" + later)
    return parts


def selection_note(s: TrainSettings, head, chosen: Selection, train_, tune_on, has_val: bool) -> str:
    """How the hyperparameters were chosen, for metrics.json; one warning line when it was not on val."""
    if tune_on is not None:
        return "val"
    k = cv_folds(s, train_.labels)
    if k and has_val:
        return f"{k}-fold cv on train"
    if k:
        warn(f"{head.name}: no val split: {head.tuned or 'the hyperparameters'} chosen by {k}-fold cv on train, "
             f"evaluated on test")
        return f"{k}-fold cv on train"
    kept = ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in head.hyperparameters(s, chosen).items() if key not in s.params)
    warn(f"{head.name}: {'' if has_val else 'no val split, and '}a class has a single training image, which no "
         f"fold can score: {kept or 'its defaults'} kept unscored"
         f"{'' if s.calibration == 'none' else ', no calibration'}")
    return "none (a class has a single training image)"


def fit_head(cache_path: Path, s: TrainSettings, expected: dict | None = None, head=None) -> Trained:
    """Fit `head` (default: classifier `s.classifier` of the zoo) on a feature cache by the protocol above.
    `expected` ({field: value}, e.g. {"backbone": "resnet18"}) makes it refuse a cache made otherwise."""
    head = head or ZooHead(s)
    with open_cache(cache_path) as cache:   # everything from this one file, even if it is replaced meanwhile
        check_expected(cache, expected or {})
        parts = labelled_splits(cache, cache_path)
        dataset = cache.dataset_id()
    train_, val, test = parts["train"], parts.get("val"), parts.get("test")
    if cache.multi_label:
        return multilabel.fit_multilabel(cache, s, head, (train_, val, test), dataset)
    evaluation = test if test is not None else val
    tune_on = val if test is not None else None   # None: k-fold on train
    start = time.perf_counter()
    X, y = train_.features, train_.labels
    if tune_on is not None:
        X, y = np.concatenate([X, tune_on.features]), np.concatenate([y, tune_on.labels])
    with one_thread_if_small(X.size, head.in_torch):
        chosen = head.select(s, train_.features, train_.labels,
                             *(() if tune_on is None else (tune_on.features, tune_on.labels)))
        model = head.refit(s, chosen, X, y)
        probabilities = has_probabilities(model[-1])
        held, held_y = held_out_scores(s, head, chosen, train_, tune_on, len(cache.classes))
    temperature = (None if s.calibration == "none" or not len(held_y) else   # no fold could be made
                   calibration.Temperature.fit(held, held_y, probabilities, floor(head.name)))
    fit_seconds = time.perf_counter() - start
    t = time.perf_counter()
    raw = scores_of(model, evaluation.features, len(cache.classes))
    predict_seconds = time.perf_counter() - t
    scores = temperature.apply(raw) if temperature else raw
    metrics = evaluate(evaluation.labels, scores, cache.classes, probabilities or temperature is not None)
    metrics.update(calibration.assess(evaluation.labels, raw, scores if temperature else
                                      calibration.uncalibrated(raw, probabilities), probabilities))
    note = selection_note(s, head, chosen, train_, tune_on, val is not None)
    metrics.update(val_score=chosen.score, selection=note, eval_split="test" if test is not None else "val",
                   n_train=len(train_.labels), n_val=0 if val is None else len(val.labels),
                   n_test=0 if test is None else len(test.labels), n_eval=len(evaluation.labels),
                   fit_seconds=fit_seconds, predict_seconds=predict_seconds,
                   extract_seconds=cache.attrs.get("extract_seconds"),
                   hyperparameters={**head.hyperparameters(s, chosen), "preprocess": s.preprocess,
                                    "class_weight": s.class_weight},
                   search=head.search(chosen))
    info = {**run_info(cache, head.name, s, dataset),
            **({"calibration": temperature.to_dict()} if temperature else {})}
    familiarity = Familiarity.fit(model[0].transform(train_.features),
                                  None if val is None else model[0].transform(val.features), s.novelty_quantile)
    return Trained(model, info, metrics, evaluation.labels, scores.argmax(1), familiarity, (held_y, held))


def run_info(cache, classifier: str, s: TrainSettings, dataset: str) -> dict:
    """What model.json records of the run: the head, the classes, the backbone and cache behind it, the data."""
    return {"classifier": classifier, "classes": cache.classes, "backbone": model_spec(cache.attrs).to_dict(),
            "fingerprint": cache.attrs["fingerprint"], "cache": fingerprinted(cache.attrs),
            "feature_preprocessing": s.preprocess, "dataset": dataset}


def held_out_scores(s: TrainSettings, head, chosen: Selection, train_, val, n_classes: int) -> tuple:
    """(scores, labels) of images no fit saw, of the val score: what a single-label head's calibration is
    fitted on and the model directory keeps (modeldir.HELD_OUT). With a val split to tune on (`val` given), the
    chosen value fitted on train and scored on val; without one, out-of-fold scores on train; none (no row)
    when no fold can be made (`cv_folds`)."""
    if val is not None:
        return scores_of(head.refit(s, chosen, train_.features, train_.labels), val.features, n_classes), val.labels
    if not cv_folds(s, train_.labels):
        return np.empty((0, n_classes)), train_.labels[:0]
    return out_of_fold_scores(s, head, chosen, train_.features, train_.labels, n_classes), train_.labels


def out_of_fold_scores(s: TrainSettings, head, chosen: Selection, X, y, n_classes: int) -> np.ndarray:
    """Each row's scores from the chosen value fitted on the other folds, in the folds of selection."""
    held = np.empty((len(y), n_classes))
    split = KFold if np.ndim(y) == 2 else StratifiedKFold
    for fit_rows, scored in split(cv_folds(s, y), shuffle=True, random_state=s.seed).split(X, y):
        held[scored] = scores_of(head.refit(s, chosen, X[fit_rows], y[fit_rows]), X[scored], n_classes)
    return held


def floor(classifier: str) -> float:
    """Where calibration clips the probabilities of `classifier` (pipeline.heads.classifiers)."""
    return CLASSIFIERS[classifier].floor if classifier in CLASSIFIERS else calibration.FLOOR


def save(trained: Trained, out_dir: Path) -> None:
    """Write the model directory of `trained` at `out_dir` (`modeldir.check_out` it first)."""
    m = trained.metrics
    kind, head = stored.form(trained.model, trained.info["classifier"])   # refuses a head it cannot store
    with modeldir.staged(out_dir) as folder:
        info = {**trained.info, **trained.familiarity.save(folder)}
        info["files"] = {**info["files"], **modeldir.write_held_out(folder, *trained.held_out)}
        if info.get("multi_label"):
            modeldir.write(folder, kind, head, info, m, [])
            precision_recall_png(m["per_class"], folder / "confusion.png", f"{info['classifier']} on "
                                 f"{m['eval_split']}: macro AP {m['macro_ap']:.3f}, macro F1 {m['macro_f1']:.3f}")
        else:
            modeldir.write(folder, kind, head, info, m,
                           confusion_rows(trained.labels, trained.predicted, trained.info["classes"]))
            confusion_png(trained.labels, trained.predicted, trained.info["classes"], folder / "confusion.png",
                          f"{trained.info['classifier']} on {m['eval_split']}: top-1 {m['top1']:.3f}")
        what = "mean per-class ECE" if info.get("multi_label") else "ECE"
        calibration.reliability_png(m["reliability"], folder / "reliability.png",
                                    f"{trained.info['classifier']} on {m['eval_split']}: {what} {m['ece']:.3f} "
                                    f"({m['ece_uncalibrated']:.3f} uncalibrated)")


def train(cache_path: Path, out_dir: Path, s: TrainSettings, expected: dict | None = None,
          force: bool = False) -> dict:
    """Fit classifier `s.classifier` on a feature cache and write a model directory (replacing one already
    at `out_dir` only with `force`); returns its metrics."""
    modeldir.check_out(out_dir, force)
    trained = fit_head(cache_path, s, expected)
    save(trained, out_dir)
    return trained.metrics


def model_spec(attrs: dict) -> BackboneSpec:
    """The backbone a head on this cache needs: the cache's, with its default layer alone (the one trained on)."""
    spec = BackboneSpec.from_attrs(attrs)
    return replace(spec, layers=(spec.layer,))
