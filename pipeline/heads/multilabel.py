"""Stage two on a multi-label cache (`Cache.multi_label`: labels are [N, classes] 0/1): the protocol of
pipeline.heads.train, scored by macro average precision, plus one decision threshold per class.

Each classifier says how it learns several labels (`ClassifierSpec.multi_label`): one binary head per class
through scikit-learn's OneVsRestClassifier (logreg, torch_logreg, linear_svm, ridge), or the head itself on the
0/1 matrix (knn: distance-weighted neighbour votes per class; torch_linear and torch_mlp: sigmoid outputs
trained with BCE). rbf_svm is refused.

Thresholds: with a test split, the chosen value is fitted on train and scored on val, and each class's
threshold is the score maximising its F1 there; without one, on out-of-fold scores of train. An image carries
a class when its score reaches the class's threshold. A class without a positive keeps the default (0.5 for
probabilities, 0 for decision values), named in one warning. They are kept in model.json as `thresholds`
({class: threshold}) beside `multi_label: true`.
"""
from __future__ import annotations

import time

import numpy as np

from pipeline.heads.classifiers import CLASSIFIERS, one_thread_if_small
from pipeline.heads.familiarity import Familiarity
from pipeline.heads.metrics import evaluate_multilabel, macro_ap, tuned_thresholds
from pipeline.runtime.errors import InputError, warn


UNCALIBRATED = "none: multi-label scores are used as the head gives them"   # metrics.json `calibration`


def thresholds_tuned_on(Y: np.ndarray, scores: np.ndarray, default: float, classes: list[str], split: str
                        ) -> np.ndarray:
    """`tuned_thresholds` on (Y, scores) of `split`, naming in one warning the classes without a positive there
    (they keep `default`)."""
    thresholds, untuned = tuned_thresholds(Y, scores, default)
    if untuned:
        warn(f"no positive in {split} for {', '.join(classes[c] for c in untuned)}: "
             f"kept the default threshold {default:g}")
    return thresholds


def recorded(thresholds: np.ndarray, classes: list[str]) -> dict:
    """What model.json records of a multi-label model: `multi_label` and each class's threshold."""
    return {"multi_label": True, "thresholds": {c: float(v) for c, v in zip(classes, thresholds)}}


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


def held_out_scores(head, s, chosen, train_, val) -> tuple[np.ndarray, np.ndarray]:
    """Scores no fit saw, and their labels, that the thresholds are tuned on (module docstring)."""
    from sklearn.model_selection import KFold
    if val is not None:
        Y, held = val.labels, scores_of(head.refit(s, chosen, train_.features, train_.labels), val.features)
    else:
        X, Y = train_.features, train_.labels
        held = np.empty(Y.shape)
        for fit_rows, scored in KFold(min(s.cv_folds, len(Y)), shuffle=True, random_state=s.seed).split(X):
            held[scored] = scores_of(head.refit(s, chosen, X[fit_rows], Y[fit_rows]), X[scored])
    return held, Y


def fit_multilabel(cache, s, head, splits: tuple, dataset: str):
    """`pipeline.heads.train.fit_head` on a multi-label cache (open), its splits read: a `Trained` whose
    `labels` and `predicted` are the evaluation split's 0/1 matrices. `splits`: train, val and test (or None)."""
    from pipeline.heads.train import Trained, cv_folds, run_info
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
        held, held_Y = held_out_scores(head, s, chosen, train_, val if has_test else None)
    fit_seconds = time.perf_counter() - start
    thresholds = thresholds_tuned_on(held_Y, held, 0.5 if probabilistic(model[-1]) else 0.0, cache.classes,
                                     "val" if has_test else "train")
    t = time.perf_counter()
    scores = scores_of(model, evaluation.features)
    metrics = {**evaluate_multilabel(evaluation.labels, scores, thresholds, cache.classes),
               "calibration": UNCALIBRATED}
    metrics.update(val_score=chosen.score, selection="val" if has_test else f"{cv_folds(s, train_.labels)}-fold "
                   f"cv on train", eval_split="test" if has_test else "val", n_train=len(train_.labels),
                   n_val=len(val.labels), n_test=len(evaluation.labels) if has_test else 0,
                   n_eval=len(evaluation.labels), fit_seconds=fit_seconds, predict_seconds=time.perf_counter() - t,
                   extract_seconds=cache.attrs.get("extract_seconds"), search=head.search(chosen),
                   hyperparameters={**head.hyperparameters(s, chosen), "preprocess": s.preprocess})
    info = {**run_info(cache, head.name, s, dataset), **recorded(thresholds, cache.classes)}
    familiarity = Familiarity.fit(model[0].transform(train_.features), model[0].transform(val.features),
                                  s.novelty_quantile)
    return Trained(model, info, metrics, evaluation.labels, (scores >= thresholds).astype(np.uint8), familiarity)
