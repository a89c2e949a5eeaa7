"""Stage two on a multi-label cache (`Cache.multi_label`: labels are [N, classes] 0/1): the protocol of
pipeline.heads.train, scored by macro average precision, plus one decision threshold per class.

Each classifier says how it learns several labels (`ClassifierSpec.multi_label`): one binary head per class
through scikit-learn's OneVsRestClassifier (logreg, torch_logreg, linear_svm, ridge), or the head itself on the
0/1 matrix (knn: distance-weighted neighbour votes per class; torch_linear and torch_mlp: sigmoid outputs
trained with BCE). rbf_svm is refused.

Held-out scores: with a test split, those of the chosen value fitted on train and scored on val; without one,
out-of-fold scores of train. They give the selection score and are kept in the model directory
(modeldir.HELD_OUT, for compare's intervals).
Calibration and thresholds are fitted on out-of-fold scores of the rows the model is fitted on (train+val with
a test split, train without: the held-out scores then), k folds of the chosen value: of all held-out scores,
the nearest to those of the final model, and on the most images. With `--calibration auto` (the default) or
`platt` each class gets Platt scaling (calibration.ClassPlatt), with `temperature` its temperature
(calibration.ClassTemperatures); the model's scores are then probabilities and each class's threshold is half
the best F1 it reaches on the calibrated scores (metrics.half_best_f1_thresholds);
with `--calibration none` it is the head's own score maximising the class's F1. An image carries a class when
its score reaches the class's threshold. A class without a positive keeps the default (0.5 for probabilities,
0 for decision values), named in one warning. They are kept in model.json as `thresholds` ({class: threshold})
beside `multi_label: true`.
"""
from __future__ import annotations

import time

import numpy as np

from pipeline.heads.calibration import assess_multilabel, fitted
from pipeline.heads.classifiers import CLASSIFIERS, one_thread_if_small
from pipeline.heads.familiarity import Familiarity
from pipeline.heads.metrics import evaluate_multilabel, half_best_f1_thresholds, macro_ap, tuned_thresholds
from pipeline.runtime.errors import InputError, warn


def wrapped(classifier: str, head):
    """`head` (unfitted, of zoo classifier `classifier`) made to learn a 0/1 label matrix."""
    how = CLASSIFIERS[classifier].multi_label
    if how == "one-vs-rest":
        from sklearn.multiclass import OneVsRestClassifier
        return OneVsRestClassifier(head)
    if how == "native":
        return head
    able = [name for name, spec in CLASSIFIERS.items() if spec.multi_label]
    raise InputError(f"classifier {classifier} does not train on a multi-label cache; choose one of: "
                     f"{', '.join(able)}")


def label_scores(head, X: np.ndarray) -> np.ndarray:
    """[N, classes]: each class's score for each image: a probability (sigmoid, one-vs-rest or neighbour
    votes) or a decision value (`probabilistic`)."""
    if hasattr(head, "scores"):   # the torch heads: sigmoids
        return head.scores(X)
    if type(head).__name__ == "OneVsRestClassifier":
        return head.predict_proba(X) if probabilistic(head) else head.decision_function(X)
    votes = head.predict_proba(X)   # knn: one [N, 2] array per class (both values seen in training)
    return np.stack([v[:, list(c).index(1)] for v, c in zip(votes, head.classes_)], 1)


def is_multi_label(head) -> bool:
    """Whether a fitted head was fitted on a 0/1 label matrix."""
    return (type(head).__name__ == "OneVsRestClassifier" or getattr(head, "multi_label_", False)
            or isinstance(getattr(head, "classes_", None), list))


def probabilistic(head) -> bool:
    """Whether `label_scores` of `head` are probabilities (else decision values, whose neutral point is 0)."""
    if type(head).__name__ == "OneVsRestClassifier":
        return hasattr(head.estimators_[0], "predict_proba")
    return True


def torch_layers(head) -> list:
    """Torch layers giving `label_scores` of a fitted multi-label head, for export and Grad-CAM: each class's
    sigmoid (decision values as they are) of a linear one-vs-rest head, or a torch head's sigmoids."""
    import torch
    from pipeline.heads.classifiers import linear_layer
    if hasattr(head, "net_"):
        return [head.net_, torch.nn.Sigmoid()]
    # a binary linear head's decision value: coef_ is one row, or (TorchLogReg) two softmax rows, whose difference
    weight = np.stack([e.coef_[-1] - (e.coef_[0] if len(e.coef_) == 2 else 0) for e in head.estimators_])
    bias = np.array([np.atleast_1d(e.intercept_)[-1] - (e.intercept_[0] if np.size(e.intercept_) == 2 else 0)
                     for e in head.estimators_])
    return [linear_layer(weight, bias), *([torch.nn.Sigmoid()] if probabilistic(head) else [])]


def scores_of(model, X: np.ndarray) -> np.ndarray:
    """`label_scores` of a fitted preprocessing + head pipeline."""
    return label_scores(model[-1], model[0].transform(X))


def score(model, X: np.ndarray, Y: np.ndarray) -> float:
    """The selection score of a fitted model on (X, Y): macro average precision."""
    return macro_ap(Y, scores_of(model, X))


def check_learnable(Y: np.ndarray, classes: list[str]) -> None:
    """A class on no training image, or on every one, leaves a binary head nothing to tell apart."""
    for c, n in zip(classes, Y.sum(0)):
        if n in (0, len(Y)):
            raise InputError(f"label '{c}' is on {'no' if n == 0 else 'every'} training image: a head cannot "
                            f"learn it; fix the labels file")


def decision_rule(s, classifier: str, oof: np.ndarray, Y: np.ndarray, probabilities: bool) -> tuple:
    """(calibration, thresholds, the classes left at the default threshold), from the out-of-fold scores `oof`
    of the rows (labels `Y`) the model is fitted on (module docstring)."""
    from pipeline.heads.train import floor
    if s.calibration == "none":
        return None, *tuned_thresholds(Y, oof, 0.5 if probabilities else 0.0)
    calibration = fitted(s.calibration, True, oof, Y, probabilities, floor(classifier))
    return calibration, *half_best_f1_thresholds(Y, calibration.apply(oof))


def calibrated_metrics(Y: np.ndarray, raw: np.ndarray, calibration, thresholds: np.ndarray, classes: list[str],
                       probabilities: bool) -> tuple[np.ndarray, dict]:
    """The evaluation split's scores through `calibration` (None: as they are) and their metrics at
    `thresholds`, with the calibration error before and after."""
    scores = calibration.apply(raw) if calibration else raw
    return scores, {**evaluate_multilabel(Y, scores, thresholds, classes),
                    **assess_multilabel(Y, raw, scores if calibration else None, probabilities)}


def fit_multilabel(cache, s, head, splits: tuple, dataset: str):
    """`pipeline.heads.train.fit_head` on a multi-label cache (open), its splits read: a `Trained` whose
    `labels` and `predicted` are the evaluation split's 0/1 matrices. `splits`: train, val and test (or None)."""
    from pipeline.heads.train import Trained, cv_folds, held_out_scores, out_of_fold_scores, run_info
    train_, val, test = splits
    check_learnable(train_.labels, cache.classes)
    if s.class_weight is not None:
        raise InputError("class_weight does not apply to a multi-label cache")
    has_test = test is not None
    X = np.concatenate([train_.features, val.features]) if has_test else train_.features
    Y = np.concatenate([train_.labels, val.labels]) if has_test else train_.labels
    evaluation = test if has_test else val
    start = time.perf_counter()
    with one_thread_if_small(X.size, head.in_torch):
        chosen = (head.select(s, train_.features, train_.labels, val.features, val.labels) if has_test
                  else head.select(s, train_.features, train_.labels))
        model = head.refit(s, chosen, X, Y)
        held, held_Y = held_out_scores(s, head, chosen, train_, val if has_test else None, len(cache.classes))
        oof = out_of_fold_scores(s, head, chosen, X, Y, len(cache.classes)) if has_test else held
    fit_seconds = time.perf_counter() - start
    probabilities = probabilistic(model[-1])
    calibration, thresholds, untuned = decision_rule(s, head.name, oof, Y, probabilities)
    if untuned:
        warn(f"no positive in {'train+val' if has_test else 'train'} for "
             f"{', '.join(cache.classes[c] for c in untuned)}: kept the default threshold {thresholds[untuned[0]]:g}")
    t = time.perf_counter()
    scores, metrics = calibrated_metrics(evaluation.labels, scores_of(model, evaluation.features), calibration,
                                         thresholds, cache.classes, probabilities)
    metrics.update(val_score=chosen.score, selection="val" if has_test else f"{cv_folds(s, train_.labels)}-fold "
                   f"cv on train", eval_split="test" if has_test else "val", n_train=len(train_.labels),
                   n_val=len(val.labels), n_test=len(evaluation.labels) if has_test else 0,
                   n_eval=len(evaluation.labels), fit_seconds=fit_seconds, predict_seconds=time.perf_counter() - t,
                   extract_seconds=cache.attrs.get("extract_seconds"), search=head.search(chosen),
                   hyperparameters={**head.hyperparameters(s, chosen), "preprocess": s.preprocess})
    info = {**run_info(cache, head.name, s, dataset), "multi_label": True,
            "thresholds": {c: float(v) for c, v in zip(cache.classes, thresholds)},
            **({"calibration": calibration.to_dict()} if calibration else {})}
    familiarity = Familiarity.fit(model[0].transform(train_.features), model[0].transform(val.features),
                                  s.novelty_quantile)
    return Trained(model, info, metrics, evaluation.labels, (scores >= thresholds).astype(np.uint8), familiarity,
                   (held_Y, held))
